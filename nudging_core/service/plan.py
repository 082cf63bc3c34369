"""From a parsed request to the plans of its choices: every check first, then the prompts.

`plan` raises each 400 a request deserves (input limits, fields the model's method cannot
honour, the `max_tokens` cap, bad messages) before it makes any upstream request; only then
are the prompts rendered (all at once), which with `chat_template: auto` or a token-id prompt
asks the upstream. A batched completions request has one plan per prompt and choice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from nudging_core.config import LimitsConfig
from nudging_core.errors import invalid_request
from nudging_core.generation import GenerationRequest
from nudging_core.methods import METHODS
from nudging_core.nudging import NudgingParams
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest, unsupported_fields
from nudging_core.registry import ServedModel
from nudging_core.types import SamplingParams

from .limits import check_limits
from .prompts import PromptPlan, Prompts, TokenPrompt, check_chat, check_completion, render

AnyRequest = CompletionRequest | ChatCompletionRequest
# The request fields that ask for logprobs, and the most alternatives a nudged model returns
# per position (each upstream is asked for them: vLLM's default `--max-logprobs`).
LOGPROB_FIELDS = frozenset({"logprobs", "top_logprobs"})
MAX_NUDGED_LOGPROBS = 20
# Fields the proxy itself interprets; everything else a passthrough method forwards.
OWN_FIELDS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
     "stop", "stream", "stream_options", "seed", "user", "nudging"}
)


@dataclass(frozen=True, slots=True)
class ChoicePlan:
    """One choice of a request, ready to run: the model that serves it, its generation and its
    index in the response (OpenAI's: prompt i, choice j is i * n + j)."""

    served: ServedModel
    request: GenerationRequest
    index: int


def max_tokens_of(served: ServedModel, request: AnyRequest) -> int:
    """The budget of each choice: the requested tokens (at most the model's limit) or its default."""
    requested = request.requested_max_tokens()
    if requested is None:
        return served.config.default_max_tokens
    if requested == 0 and not (isinstance(request, CompletionRequest) and request.echo):
        # As vLLM: only an echo (its prompt's logprobs, lm-eval's log-likelihood) asks for none.
        raise invalid_request("max_tokens must be at least 1, got 0 (0 only with echo)", "max_tokens")
    limit = served.config.max_tokens_limit
    if requested > limit:
        field_name = request.max_tokens_param()
        raise invalid_request(f"{field_name} must be at most {limit} for this model", field_name)
    return requested


def _nudging_params(served: ServedModel, request: AnyRequest) -> NudgingParams:
    config = served.config
    options = request.nudging
    return NudgingParams(
        threshold=options.threshold if options and options.threshold is not None else config.threshold,
        lookahead_tokens=(
            options.lookahead_tokens if options and options.lookahead_tokens is not None
            else config.lookahead_tokens
        ),
        chunk_tokens=config.chunk_tokens,
        probe_window=config.probe_window,
        max_rounds=config.max_rounds,
        strategy=options.strategy if options and options.strategy is not None else config.strategy,
        cleanup=options.cleanup if options and options.cleanup is not None else config.cleanup,
    )


def _passthrough_fields(request: AnyRequest) -> dict[str, Any]:
    dumped = request.model_dump(exclude_unset=True, exclude_none=True)
    fields = {key: value for key, value in dumped.items() if key not in OWN_FIELDS}
    if isinstance(request, ChatCompletionRequest):
        # The upstream writes the chat as a completion: chat's `logprobs: true` with
        # `top_logprobs: k` is the completions API's `logprobs: k`.
        fields.pop("top_logprobs", None)
        fields.pop("logprobs", None)
        if request.logprobs:
            fields["logprobs"] = request.top_logprobs or 0
    return fields


def _wants_logprobs(request: AnyRequest) -> bool:
    if isinstance(request, ChatCompletionRequest):
        return request.logprobs
    return request.logprobs is not None


def _top_logprobs(request: AnyRequest) -> int:
    """The alternatives per position the client asked for (chat's `top_logprobs`, the
    completions API's `logprobs`)."""
    if isinstance(request, ChatCompletionRequest):
        return request.top_logprobs or 0
    return request.logprobs or 0


def _check_nudged_logprobs(request: AnyRequest) -> None:
    """The logprobs a nudged model can return: up to its upstreams' limit, as vLLM asks."""
    param = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs and not request.logprobs:
        raise invalid_request("when using top_logprobs, logprobs must be set to true", "top_logprobs")
    if _top_logprobs(request) > MAX_NUDGED_LOGPROBS:
        raise invalid_request(f"{param} must be at most {MAX_NUDGED_LOGPROBS} for this model", param)


# What `on_tools: nudging_only` hands to a nudged model's nudging model alone (service/chat.py).
TOOL_FIELDS = ("tools", "tool_choice", "response_format")
# Fields only an upstream that renders the chat itself can honour.
CHAT_ONLY_FIELDS = ("tools", "tool_choice", "functions", "function_call")


def _check_rendered_chat(request: ChatCompletionRequest) -> None:
    """A passthrough model whose chat the proxy renders sends a completion: tool calls would
    be silently dropped, so asking for them is a 400."""
    asked = [name for name in unsupported_fields(request) if name in CHAT_ONLY_FIELDS]
    if asked:
        raise invalid_request(
            f"{asked[0]} needs a model whose upstream answers chat itself (passthrough: chat)", asked[0]
        )


def check(
    request: AnyRequest, served: ServedModel, limits: LimitsConfig
) -> tuple[list[PromptPlan | TokenPrompt], int]:
    """Every 400 `request` deserves, raised without I/O; else its prompts' plans and budget."""
    check_limits(request, limits)
    method = served.config.method
    spec = METHODS[method]
    if spec.combined:
        unsupported = [name for name in unsupported_fields(request)
                       if not (spec.returns_logprobs and name in LOGPROB_FIELDS)]
        if unsupported:
            hint = (" (on_tools: nudging_only answers it with the nudging model alone)"
                    if method == "nudging" and isinstance(request, ChatCompletionRequest)
                    and unsupported[0] in TOOL_FIELDS else "")
            raise invalid_request(
                f"{unsupported[0]} is not supported for models of method {method!r}{hint}", unsupported[0]
            )
        _check_nudged_logprobs(request)
    elif isinstance(request, ChatCompletionRequest):
        _check_rendered_chat(request)
    max_tokens = max_tokens_of(served, request)
    if isinstance(request, ChatCompletionRequest):
        return [check_chat(served, request)], max_tokens
    return check_completion(served, request), max_tokens


async def _render_all(served: ServedModel, plans: list[PromptPlan | TokenPrompt]) -> list[Prompts]:
    """The prompts of `plans`, rendered concurrently; the first failure cancels the others."""
    if len(plans) == 1:
        return [await render(served, plans[0])]
    tasks = [asyncio.ensure_future(render(served, prompt_plan)) for prompt_plan in plans]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def plan(request: AnyRequest, served: ServedModel, limits: LimitsConfig) -> list[ChoicePlan]:
    """The plans of `request`'s choices, prompt by prompt; raises `APIError` (a 400 before any
    upstream request)."""
    return await render_plans(request, served, check(request, served, limits))


async def render_plans(
    request: AnyRequest, served: ServedModel, checked: tuple[list[PromptPlan | TokenPrompt], int]
) -> list[ChoicePlan]:
    """The plans of a `check`ed request: its prompts rendered, which may ask the upstream
    (`chat_template: auto`, token-id prompts), so the server admits the request first."""
    prompt_plans, max_tokens = checked
    rendered = await _render_all(served, prompt_plans)
    config = served.config
    combined = METHODS[config.method].combined
    sampling = SamplingParams(
        temperature=request.temperature if request.temperature is not None else config.temperature,
        top_p=request.top_p if request.top_p is not None else config.top_p,
        seed=request.seed,
    )
    params = _nudging_params(served, request)
    passthrough_fields = {} if combined else _passthrough_fields(request)
    return [
        ChoicePlan(served, GenerationRequest(
            method=config.method,
            max_tokens=max_tokens,
            base_prompt=prompts.base,
            nudging_prompt=prompts.nudging,
            prompt_token_ids=prompts.token_ids,
            stop=tuple(request.stop_list()),
            sampling=sampling,
            params=params,
            choice_index=choice,
            passthrough_fields=passthrough_fields,
            return_logprobs=_wants_logprobs(request),
            top_logprobs=_top_logprobs(request),
        ), index=prompt_index * request.n + choice)
        for prompt_index, prompts in enumerate(rendered)
        for choice in range(request.n)
    ]
