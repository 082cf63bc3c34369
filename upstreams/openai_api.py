"""vLLM's flavour of the OpenAI completions protocol, as both upstream servers speak it.

The simulator and the local upstream serve the same subset, so the wire format lives here once:
the error type and bodies, the request model, its checks and the sampling it asks for, the
completion envelope, usage and logprobs blocks, SSE framing and the ``/stats`` counters. Where
the two servers answer differently (wording, the error ``param``), a :class:`ServerWording` says how;
what each does beyond this (token-id prompts, prompt logprobs, chat templates) stays in its own
package. No FastAPI here (see ``openai_server``), so parsing requests stays cheap to import.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ServerWording:
    """How one server words the shared protocol; each keeps the answers it always gave."""

    owned_by: str  # ``owned_by`` of its model in ``/v1/models``
    internal_error: str  # a 500's message, before ": <exception type>"
    one_sample_only: str  # the refusal of n > 1 or best_of > 1
    names_params: bool  # whether errors name the field at fault in ``param`` (vLLM does)
    serves_prompt_logprobs: bool  # whether echo with logprobs is served, or a 400

    def param(self, name: str) -> str | None:
        return name if self.names_params else None


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one completion is sampled, as its request asked (the engines' input)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # top-k size to report; None = no logprobs
    stop: tuple[str, ...] = ()


class ApiError(Exception):
    """A refused request, reported like vLLM 0.32: ``{"error": {"message", "type", "param",
    "code"}}``."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


Prompt = TypeVar("Prompt")


class CompletionRequest(BaseModel, Generic[Prompt]):
    """Fields of ``POST /v1/completions``; unknown fields are ignored, as vLLM does.

    A server subclasses it with the prompt shapes it accepts (what the others are refused
    with is its own wording) and says how a prompt becomes its text.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float | None = Field(default=1.0, ge=0.0)  # the OpenAI default
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = False
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int | None = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        return [s for s in items if s]  # an empty stop string would stop everything

    def stop_strings(self) -> list[str]:
        # The validator made `stop` a list; the field's type is what clients may send.
        return list(self.stop) if isinstance(self.stop, list) else []

    def sampling(self, prompt_tokens: int, max_model_len: int, wording: ServerWording) -> Sampling:
        """The request's sampling, as vLLM 0.32 reads it: a prompt over the context is refused,
        and so is a `max_tokens` over it; otherwise `max_tokens` (null: 16) is shortened to the
        room the prompt leaves, and a prompt that leaves none is refused ("max_tokens must be
        at least 1, got 0").
        """
        if prompt_tokens > max_model_len:
            raise context_length_error(max_model_len, prompt_tokens, 0, wording)
        requested = self.max_tokens if self.max_tokens is not None else 16
        if requested > max_model_len:
            raise ApiError(f"max_tokens={requested} cannot be greater than max_model_len={max_model_len}. "
                           "Please request fewer output tokens.", param=wording.param("max_tokens"))
        max_tokens = min(requested, max_model_len - prompt_tokens)
        if max_tokens == 0 and requested > 0:
            raise ApiError("max_tokens must be at least 1, got 0.", param=wording.param("max_tokens"))
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            seed=self.seed,
            logprobs=self.logprobs,
            stop=tuple(self.stop_strings()),
        )

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Request = TypeVar("Request", bound=BaseModel)
Completion = TypeVar("Completion", bound=CompletionRequest[Any])


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def parse_body(model: type[Request], body: Any) -> Request:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise ApiError(describe_validation_error(error)) from None


def parse_completion_request(model: type[Completion], body: Any, max_logprobs: int,
                             wording: ServerWording) -> Completion:
    request = parse_body(model, body)
    if (request.n or 1) > 1 or (request.best_of or 1) > 1:
        raise ApiError(wording.one_sample_only, param=wording.param("n"))
    if request.logprobs is not None and request.logprobs > max_logprobs:
        raise ApiError(f"Requested sample logprobs of {request.logprobs}, which is greater "
                       f"than max allowed: {max_logprobs}", param=wording.param("logprobs"))
    if request.echo and request.logprobs is not None and not wording.serves_prompt_logprobs:
        raise ApiError("echo with logprobs (prompt logprobs) is not supported by this server",
                       param=wording.param("echo"))
    if request.stream_options is not None and not request.stream:
        raise ApiError("Stream options can only be defined when `stream=True`.",
                       param=wording.param("stream_options"))
    return request


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid value')}")
    return "invalid request: " + "; ".join(parts)


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int,
                         wording: ServerWording) -> ApiError:
    # vLLM 0.32's wording: clients (the proxy included) recognise "maximum context length".
    # (`max_tokens` plays no part: vLLM shortens it to the room the prompt leaves.)
    return ApiError(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains at least {prompt_tokens} input tokens, which exceeds this limit even without "
        "any output tokens. Please reduce the length of the input prompt.",
        param=wording.param("input_tokens"),
    )


def check_model(requested: str | None, served: str, wording: ServerWording) -> None:
    """A request naming another model than the served one is a 404 (naming none is fine)."""
    if requested is not None and requested != served:
        raise ApiError(f"The model `{requested}` does not exist.", 404, "NotFoundError",
                       param=wording.param("model"))


def models_body(name: str, created: int, max_model_len: int, wording: ServerWording) -> dict[str, Any]:
    """``GET /v1/models``: the one served model, with vLLM's ``max_model_len``."""
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": created, "owned_by": wording.owned_by,
        "root": name, "parent": None, "max_model_len": max_model_len, "permission": [],
    }]}


def logprobs_block(tokens: list[str], token_logprobs: list[float | None],
                   top_logprobs: list[dict[str, float] | None],
                   text_offset: list[int]) -> dict[str, Any]:
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """The body and the SSE chunks of one completion (one choice, as n=1 is all we serve)."""

    def __init__(self, name: str, system_fingerprint: str | None = None) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())  # one id and time for every chunk, as vLLM
        self.name = name
        # vLLM names its build on the whole answer and on the usage chunk only.
        self.system_fingerprint = system_fingerprint

    def _fingerprinted(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.system_fingerprint is not None:
            body["system_fingerprint"] = self.system_fingerprint
        return body

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.name, "choices": choices}

    def one_choice(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
                   stop_reason: str | None) -> dict[str, Any]:
        return self.envelope([{"index": 0, "text": text, "logprobs": logprobs,
                               "finish_reason": finish_reason, "stop_reason": stop_reason}])

    def body(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
             stop_reason: str | None, prompt_tokens: int, completion_tokens: int,
             ) -> dict[str, Any]:
        """The JSON answer of a request that does not stream."""
        body = self.one_choice(text, logprobs, finish_reason, stop_reason)
        body["usage"] = usage_block(prompt_tokens, completion_tokens)
        return self._fingerprinted(body)

    def chunk(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None = None,
              stop_reason: str | None = None) -> str:
        return sse(self.one_choice(text, logprobs, finish_reason, stop_reason))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk before [DONE] when the client asked for ``include_usage``."""
        chunk = self.envelope([])
        chunk["usage"] = usage_block(prompt_tokens, completion_tokens)
        return sse(self._fingerprinted(chunk))


@dataclass(slots=True)
class Counters:
    """Base of a server's ``/stats`` counters.

    Each server declares its own int fields (they count different things, and their order is
    the order of the JSON keys), one of them ``open_requests``.
    """

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        # Requests in flight stay open; only the totals start again.
        for field in fields(self):
            if field.name != "open_requests":
                setattr(self, field.name, 0)
