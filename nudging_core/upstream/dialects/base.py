"""What differs between completions servers, behind one small interface.

A dialect turns a `CompletionCall` into a request and the server's answers (whole, or one
stream event at a time) into `Reply`s of normalised `Token`s. Everything else (pooling,
timeouts, cancellation, error mapping) lives in the client and is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from nudging_core.types import Token

from ..call import CompletionCall
from ..errors import UpstreamError

# The pydantic config of the shapes a dialect checks answers against: exact JSON types, and
# fields a server adds beyond them kept.
ANSWER_SHAPE: Final = ConfigDict(extra="allow", strict=True)

Shape = TypeVar("Shape")


def checked(shape: TypeAdapter[Shape], role: str, payload: Any, what: str) -> Shape:
    """`payload` as `shape`, or an `UpstreamError` naming where a `what` answer went wrong."""
    try:
        return shape.validate_python(payload)
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise UpstreamError(role, f"malformed {what} (at {where or 'top level'})") from None


@dataclass(slots=True)
class Reply:
    """What one response, or one stream event, carries."""

    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    # The stream ends after this event (for servers that send no `[DONE]`).
    last: bool = False
    # The answer's text and logprobs as the server sent them (OpenAI shape: `tokens`,
    # `token_logprobs`, `top_logprobs`, `text_offset`), for passthrough models to return.
    text: str = ""
    logprobs: dict[str, Any] | None = None
    completion_tokens: int | None = None
    # vLLM's: the stop string (or stop token id) that ended the answer, on its finishing
    # event; and its build, on a whole answer and on a stream's usage event.
    stop_reason: str | int | None = None
    system_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    path: str  # relative to the upstream's base URL (".../v1/"); "../x" reaches the root
    body: dict[str, Any] | None


class Dialect(ABC):
    name: ClassVar[str]

    @abstractmethod
    def completion(self, call: CompletionCall, model: str, *, stream: bool) -> Request: ...

    @abstractmethod
    def parser(self, role: str, *, need_logprobs: bool, stream: bool) -> Parser:
        """A parser for the answers to one request (a whole response, or each stream event)."""

    @abstractmethod
    def tokenize(self, model: str, prompt: str) -> Request: ...

    @abstractmethod
    def token_count(self, payload: Any) -> int | None: ...

    async def render_chat(self, send: Sender, model: str, messages: list[dict[str, str]]) -> str | None:
        """The chat rendered by the server's own template with a generation prompt, or None
        when the server cannot do that."""
        return None

    async def detokenize(self, send: Sender, model: str, tokens: list[int]) -> str | None:
        """The text of token ids by the server's own tokenizer, or None when it has none."""
        return None


# Turns one decoded JSON answer (or stream event) into a Reply; may keep state per request.
Parser = Callable[[Any], Reply]
# Posts a request to the upstream and returns its decoded JSON answer.
Sender = Callable[[Request], Awaitable[Any]]
