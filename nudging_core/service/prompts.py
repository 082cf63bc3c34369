"""Requests to the prompts each role sees (DESIGN 4), in two steps: `check_*` reads the request
and raises its 400s without any I/O; `render` then writes the nudger's prompt, which with
`chat_template: auto` asks the upstream, and turns token-id prompts a model must read as text
into text with the upstream's /detokenize (the only I/O of planning)."""

from __future__ import annotations

from dataclasses import dataclass

from nudging_core.errors import (
    invalid_request,
    no_chat_template,
    scrub_urls,
    upstream_failure,
    upstream_unavailable,
)
from nudging_core.methods import METHODS
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest, TokenIds
from nudging_core.registry import ServedModel
from nudging_core.templates import Message, TemplateError, base_prompt, normalize_messages
from nudging_core.upstream import NoChatTemplate, UpstreamError


@dataclass(frozen=True, slots=True)
class Prompts:
    base: str
    nudging: str
    token_ids: TokenIds | None = None  # a passthrough sends these in place of its prompt


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """What `render` needs: the base prompt, and the nudger's prompt or the messages to render."""

    base: str
    nudging: str | None  # None: the upstream renders `messages` (chat_template: auto)
    messages: tuple[Message, ...] = ()
    token_ids: TokenIds | None = None  # forwarded by a passthrough as they came


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    """A token-id prompt the model must read as text: `render` detokenizes it, then plans
    the text as a text prompt."""

    token_ids: TokenIds
    nudging_prompt: str | None  # the request's explicit one


def _render_locally(served: ServedModel, messages: list[Message]) -> str | None:
    """The configured template's rendering (no I/O), or None when the upstream renders it."""
    if served.uses_upstream_template:
        return None
    if served.chat_template is None:
        # A passthrough base_only model never reads the nudger prompt.
        return ""
    try:
        return served.chat_template.render(messages, served.config.answer_start)
    except TemplateError as error:
        raise invalid_request(str(error), "messages") from None


def check_chat(served: ServedModel, request: ChatCompletionRequest) -> PromptPlan:
    config = served.config
    try:
        messages = normalize_messages(request.messages)
        base = base_prompt(
            messages, default_system=config.default_system_prompt, answer_start=config.answer_start
        )
    except TemplateError as error:
        raise invalid_request(str(error), "messages") from None
    if config.default_system_prompt and not any(m.role == "system" for m in messages):
        messages = [Message("system", config.default_system_prompt), *messages]
    return PromptPlan(base, _render_locally(served, messages), tuple(messages))


def _text_plan(served: ServedModel, prompt: str, nudging_prompt: str | None) -> PromptPlan:
    if nudging_prompt is not None:
        return PromptPlan(prompt, nudging_prompt)
    if served.config.wrap_completion_prompt:
        messages = [Message("user", prompt)]
        return PromptPlan(prompt, _render_locally(served, messages), tuple(messages))
    return PromptPlan(prompt, prompt)


def _forwards_token_ids(served: ServedModel, nudging_prompt: str | None) -> bool:
    """Whether the model's one upstream gets the client's prompt verbatim, so token ids can go
    as they came (a nudged model, a wrapped prompt or an explicit nudger prompt needs text)."""
    spec = METHODS[served.config.method]
    if spec.combined:
        return False
    return spec.prompt_role == "base" or (nudging_prompt is None and not served.config.wrap_completion_prompt)


def check_completion(served: ServedModel, request: CompletionRequest) -> list[PromptPlan | TokenPrompt]:
    """One plan per prompt of the request, in its order."""
    prompts = request.prompts()
    nudging_prompt = request.nudging.nudging_prompt if request.nudging is not None else None
    if nudging_prompt is not None and len(prompts) > 1:
        raise invalid_request(
            "nudging.nudging_prompt is the nudger's prompt for one prompt; send one request per prompt",
            "nudging.nudging_prompt",
        )
    plans: list[PromptPlan | TokenPrompt] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            plans.append(_text_plan(served, prompt, nudging_prompt))
        elif _forwards_token_ids(served, nudging_prompt):
            plans.append(PromptPlan("", "", token_ids=prompt))
        else:
            plans.append(TokenPrompt(prompt, nudging_prompt))
    return plans


async def _detokenized(served: ServedModel, token_ids: TokenIds) -> str:
    """The prompt's text by the tokenizer of the upstream that reads the prompt (the base's,
    for a nudged model); a 400 naming `prompt` where it cannot say."""
    role = METHODS[served.config.method].prompt_role
    client = served.replicas[role].pick()
    try:
        text = await client.detokenize(list(token_ids))
    except UpstreamError as error:
        if error.status_code not in (400, 422):
            raise upstream_failure(error) from None
        raise invalid_request(
            f"The {role} model's server cannot read the token ids: {scrub_urls(error.message)}", "prompt"
        ) from None
    if text is None:
        raise invalid_request(
            f"Token-id prompts need the {role} model's server to turn them into text (vLLM's "
            "POST /detokenize), and it cannot; send the prompt as text.",
            "prompt",
        )
    return text


async def _rendered_by_upstream(served: ServedModel, messages: tuple[Message, ...]) -> str:
    client = served.replicas["nudging"].pick()
    try:
        rendered = await client.render_chat([{"role": m.role, "content": m.content} for m in messages])
    except NoChatTemplate as error:
        raise no_chat_template(served.config.name, error) from None
    except UpstreamError as error:
        raise upstream_failure(error) from None
    if rendered is None:
        message = "the upstream cannot render its chat template; configure chat_template"
        raise upstream_unavailable("nudging", message, status_code=502)
    return rendered + served.config.answer_start


async def render(served: ServedModel, plan: PromptPlan | TokenPrompt) -> Prompts:
    if isinstance(plan, TokenPrompt):
        plan = _text_plan(served, await _detokenized(served, plan.token_ids), plan.nudging_prompt)
    if plan.nudging is not None:
        return Prompts(plan.base, plan.nudging, plan.token_ids)
    return Prompts(plan.base, await _rendered_by_upstream(served, plan.messages))
