"""Chat passthrough: a chat request the upstream answers through its own /v1/chat/completions.

A `base_only` or `nudging_only` model whose upstream serves chat itself (`passthrough: chat`,
or its `chat_template: auto`) forwards the client's request as it came (all its fields, the
model name swapped) and returns the upstream's answer as it came: the upstream's chat template,
tool parsing (`tools`, `tool_choice`, assistant `tool_calls`, `tool` messages) and structured
outputs (`response_format`) apply. A nudged model with `on_tools: nudging_only` answers a
request for tools or a response format so, with its nudging model alone, and says so in each
choice's `nudging` extension.

The proxy keeps its own checks: the request limits and the `max_tokens` cap are checked
before the upstream is asked, the budget (the model's `default_max_tokens` when the client
names none) is sent as `max_tokens`, and a stream that writes past it is ended. Upstream
failures become the client's errors as for every other model, and a retryable one before the
answer started is retried.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nudging_core.config import LimitsConfig
from nudging_core.errors import SERVER_ERROR, APIError, scrub_urls, upstream_failure
from nudging_core.methods import METHODS
from nudging_core.protocol import ChatCompletionRequest, unsupported_fields
from nudging_core.registry import ServedModel
from nudging_core.types import Source
from nudging_core.upstream import NoChatTemplate, UpstreamClient, UpstreamError
from nudging_core.upstream.errors import UpstreamUnreachable, is_retryable

from .limits import check_limits
from .plan import TOOL_FIELDS, max_tokens_of

T = TypeVar("T")
TOOLS_FALLBACK = {"fallback": "nudging_only", "fallback_reason": "tools"}


@dataclass(frozen=True, slots=True)
class ChatForward:
    """A chat request ready to go to one upstream's chat endpoint."""

    served: ServedModel
    role: Source
    body: dict[str, Any]  # the client's request, with the proxy's budget and defaults
    fallback: dict[str, str] | None = None  # the `nudging` extension of each choice, if any


def tool_fields(request: ChatCompletionRequest) -> list[str]:
    """The fields of `request` asking for tool calls or a response format."""
    return [name for name in unsupported_fields(request) if name in TOOL_FIELDS]


def _forwarded_body(
    served: ServedModel, request: ChatCompletionRequest, raw: dict[str, Any]
) -> dict[str, Any]:
    config = served.config
    # `nudging` is the proxy's own extension; the upstream would not know it.
    body = {key: value for key, value in raw.items() if key != "nudging"}
    if request.requested_max_tokens() is None:
        body["max_tokens"] = max_tokens_of(served, request)
    body.setdefault("temperature", config.temperature)
    body.setdefault("top_p", config.top_p)
    if config.default_system_prompt and not any(m.get("role") == "system" for m in request.messages):
        body["messages"] = [{"role": "system", "content": config.default_system_prompt}, *raw["messages"]]
    return body


async def chat_forward(
    request: ChatCompletionRequest, read_body: Callable[[], Awaitable[dict[str, Any]]], served: ServedModel,
    limits: LimitsConfig,
) -> ChatForward | None:
    """The forward of `request` if its model passes chat through, else None; raises the
    request's 400s (limits, `max_tokens`) first. `read_body` gives the request's JSON body as
    the client sent it (read only for a forward)."""
    config = served.config
    fallback = None
    if config.passes_chat_through:
        role = METHODS[config.method].prompt_role
    elif config.on_tools == "nudging_only" and tool_fields(request):
        role, fallback = "nudging", TOOLS_FALLBACK
    else:
        return None
    check_limits(request, limits)
    max_tokens_of(served, request)  # the cap's 400
    return ChatForward(served, role, _forwarded_body(served, request, await read_body()), fallback)


def _max_tokens(body: dict[str, Any]) -> int:
    # `_forwarded_body` set one of them (the checked request's, or the model's default).
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    return budget if isinstance(budget, int) else 0


@dataclass(slots=True)
class StreamBudget:
    """What the choices of a chat stream did: the chunks each wrote (every chunk that writes
    holds at least one token, so more of them than `max_tokens` means the upstream overshoots)
    and whether each finished (a stream that ends first was cut)."""

    max_tokens: int
    written: Counter[int] = field(default_factory=Counter)
    started: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)

    def allows(self, chunk: dict[str, Any]) -> bool:
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            self.started.add(index)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
                self.written[index] += 1
            if choice.get("finish_reason") is not None:
                self.finished.add(index)
        return all(count <= self.max_tokens for count in self.written.values())

    @property
    def unfinished(self) -> set[int]:
        return self.started - self.finished

    def ending(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The chunk that ends, with `length`, every choice not yet finished."""
        choices: list[dict[str, Any]] = [
            {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            for index in sorted(self.unfinished)]
        return {key: chunk[key] for key in ("id", "object", "created") if key in chunk} | {"choices": choices}


def _relabelled(forward: ChatForward, answer: dict[str, Any]) -> dict[str, Any]:
    """The upstream's answer (or stream chunk) under the proxy's model name, with the fallback
    reported on each choice (a stream: on each choice's last chunk)."""
    answer["model"] = forward.served.config.name
    if forward.fallback is not None:
        for choice in answer.get("choices") or []:
            if isinstance(choice, dict) and ("message" in choice or choice.get("finish_reason") is not None):
                choice["nudging"] = dict(forward.fallback)
    return answer


def _no_chat_template(forward: ChatForward, error: NoChatTemplate) -> APIError:
    """The upstream cannot answer chat for want of a template: the proxy's configuration is at
    fault (the model should not pass chat to it), so a server-side error that says what to change."""
    config = forward.served.config
    why, setting = (("on_tools: nudging_only", "on_tools: error") if forward.fallback is not None
                    else ("chat passthrough", "passthrough: completions with a chat_template"))
    return APIError(
        500,
        f"Model {config.name!r} sends chat to the {forward.role} model's server ({why}), which has no chat "
        f"template to render ({scrub_urls(error.message)}). Give that server a chat template, or set "
        f"the model's {setting} in the proxy's configuration.",
        type=SERVER_ERROR, code="chat_template_unavailable",
    )


async def _with_retries(forward: ChatForward, attempt: Callable[[UpstreamClient], Awaitable[T]]) -> T:
    """`attempt` on a freshly picked replica, again after a retryable failure as the model's
    `retries` allows; a failure is the client's error."""
    retries_left = forward.served.config.retries
    while True:
        try:
            return await attempt(forward.served.replicas[forward.role].pick())
        except NoChatTemplate as error:
            raise _no_chat_template(forward, error) from None
        except UpstreamError as error:
            if retries_left <= 0 or not is_retryable(error):
                raise upstream_failure(error) from None
            retries_left -= 1


async def answer_chat(forward: ChatForward) -> dict[str, Any]:
    """The upstream's whole answer."""
    answer = await _with_retries(forward, lambda client: client.chat(forward.body))
    if not isinstance(answer, dict):
        raise upstream_failure(UpstreamError(forward.role, "malformed chat answer"))
    return _relabelled(forward, answer)


async def stream_chat(forward: ChatForward) -> AsyncGenerator[dict[str, Any] | APIError, None]:
    """The upstream's stream chunks; a failure once it started is its last item. The first
    item comes once the upstream's answer started: a failure before raises."""

    async def opened(client: UpstreamClient) -> tuple[UpstreamClient, Any]:
        return client, await client.open_chat_stream(forward.body)

    client, response = await _with_retries(forward, opened)
    budget = StreamBudget(_max_tokens(forward.body))
    try:
        async for chunk in client.stream_events(response):
            if not budget.allows(chunk):
                # The upstream writes past the budget (it ignores `max_tokens`, or never ends):
                # the choices end here and leaving closes its request.
                yield _relabelled(forward, budget.ending(chunk))
                return
            yield _relabelled(forward, chunk)
        if budget.unfinished:
            raise UpstreamUnreachable(forward.role, "stream ended without a finish reason")
    except UpstreamError as error:
        yield upstream_failure(error)
    finally:
        await client.close_stream(response)
