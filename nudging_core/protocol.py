"""The OpenAI / vLLM wire format: request and response models.

Requests keep unknown fields (`extra="allow"`), as vLLM does, so passthrough models can
forward them and clients sending newer fields are not rejected. Our own `nudging` extension
is strict, since a typo there would otherwise be silently ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import (
    Annotated,
    Any,
    ClassVar,
    Final,
    Literal,
    Required,  # pydantic needs this one before Python 3.12
    TypeVar,
    cast,
)

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from nudging_core.config import LookaheadTokens, Threshold
from nudging_core.errors import invalid_request, validation_error
from nudging_core.nudging import Strategy

_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1


# --- Requests ----------------------------------------------------------------------------


class OpenAIRequestModel(BaseModel):
    # Strict JSON types, as OpenAI and vLLM: `"stream": "yes"`, `"max_tokens": "5"` and
    # `"n": true` are 400s (an integer is still a valid JSON number for a float field).
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # SDKs and frameworks send explicit nulls for optional fields (`"n": null`); OpenAI
        # reads that as "not given", so a null for a field with a non-null default is dropped.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if not (
                value is None
                and key in fields
                and not fields[key].is_required()
                and fields[key].default is not None
            )
        }


def _first_unsendable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The path of the first value in a decoded JSON body that cannot go upstream, and why.

    Python's json module accepts what JSON text cannot carry on: lone surrogates (`"\\ud800"`
    decodes, but cannot be encoded as UTF-8) and `NaN`/`Infinity`. Both would fail later,
    while forwarding or answering, as a 500.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, "contains a lone surrogate, which is not valid Unicode text"
    elif isinstance(value, float) and not math.isfinite(value):
        return path, "must be a finite number"
    elif isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and (found := _first_unsendable(key, path)):
                return found
            if found := _first_unsendable(item, f"{path}.{key}" if path else str(key)):
                return found
    return None


class StreamOptions(OpenAIRequestModel):
    # vLLM defaults this to True when stream_options is given; OpenAI documents it as opt-in.
    include_usage: bool = False


class NudgingOptions(BaseModel):
    """The request's `nudging` extension; None means "use the model's configuration"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    threshold: Threshold | None = None
    lookahead_tokens: LookaheadTokens | None = None
    strategy: Strategy | None = None
    nudging_prompt: str | None = None
    cleanup: bool | None = None
    return_provenance: bool | None = None


class _SamplingRequest(OpenAIRequestModel):
    """Fields both endpoints share, with vLLM's names and defaults (except `max_tokens`,
    whose None means the model's configured default)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=_LONG_MIN, le=_LONG_MAX)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    nudging: NudgingOptions | None = None

    # Known OpenAI fields a nudged model cannot honour; see `unsupported_fields`.
    UNSUPPORTED_FOR_NUDGING: ClassVar[tuple[str, ...]] = ()
    # vLLM's own fields a nudged model cannot honour, kept as extra fields for passthrough
    # models: a nudged generation samples with temperature, top_p and seed only.
    VLLM_FIELDS: ClassVar[tuple[str, ...]] = (
        "use_beam_search",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "truncate_prompt_tokens",
        "allowed_token_ids",
        "bad_words",
        "prompt_logprobs",
        "logits_processors",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    )

    @model_validator(mode="before")
    @classmethod
    def _sendable(cls, data: Any) -> Any:
        # An APIError, not a ValueError, so the 400 names the field (pydantic would place a
        # model validator's error at the top level).
        if found := _first_unsendable(data):
            param, reason = found
            raise invalid_request(f"Invalid value for '{param}': {reason}.", param or None)
        return data

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # OpenAI and vLLM reject stream_options on a non-streamed request (`stream` is
        # declared first, so it is validated by now).
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        """The budget the client asked for; None: the model's configured default."""
        return self.max_tokens

    def max_tokens_param(self) -> str:
        """The field that gave `requested_max_tokens`, for an error naming it."""
        return "max_tokens"


# A token-id prompt; ids are never negative (vLLM's bound).
TokenIds = tuple[int, ...]
_TokenIdList = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_SamplingRequest):
    # vLLM's four forms: a text, a batch of texts, one token-id prompt, a batch of them.
    prompt: str | list[str] | _TokenIdList | list[_TokenIdList]
    suffix: str | None = None
    echo: bool = False
    # 0 asks for the prompt's logprobs alone, with `echo` only (checked in planning).
    max_tokens: int | None = Field(default=None, ge=0)
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0)

    UNSUPPORTED_FOR_NUDGING: ClassVar[tuple[str, ...]] = (
        "echo",
        "suffix",
        "best_of",
        "logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
    )

    @field_validator("prompt")
    @classmethod
    def _no_empty_prompt_in_a_list(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        # A list holds prompts (or token ids); none of them may be empty. (A single ""
        # stays a prompt: the base model then writes from nothing.)
        if isinstance(value, list):
            if not value:
                raise ValueError("please provide at least one prompt")
            if any(item == "" or item == [] for item in value):
                raise ValueError("a prompt in the list is empty")
        return value

    def prompts(self) -> list[str | TokenIds]:
        """The request's prompts, each a text or token ids, in the order of their choices."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [tuple(prompt)]  # one token-id prompt
        batch = cast(list[str | list[int]], prompt)
        return [item if isinstance(item, str) else tuple(item) for item in batch]


@with_config(ConfigDict(extra="allow"))
class ContentPart(TypedDict, total=False):
    """One part of a message's content. Only text parts can be templated; other kinds and
    extra keys are kept so passthrough models can forward them."""

    type: Required[str]
    text: str


def _text_part_has_text(part: ContentPart) -> ContentPart:
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise ValueError("a text part needs a string 'text'")
    return part


@with_config(ConfigDict(extra="allow"))
class ChatMessage(TypedDict, total=False):
    """A chat message. Messages stay plain dicts after validation, as in vLLM, so they go
    straight to `nudging_core.templates.normalize_messages` and to passthrough upstreams
    (extra keys such as `tool_calls` are kept)."""

    role: Required[Literal["system", "developer", "user", "assistant", "tool", "function"]]
    content: str | list[Annotated[ContentPart, AfterValidator(_text_part_has_text)]] | None
    name: str


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    UNSUPPORTED_FOR_NUDGING: ClassVar[tuple[str, ...]] = (
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
    )

    # vLLM's chat fields: a nudged model renders the chat with its configured template.
    VLLM_FIELDS: ClassVar[tuple[str, ...]] = _SamplingRequest.VLLM_FIELDS + (
        "echo",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "chat_template_kwargs",
    )

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`, as in vLLM."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"


def _generic_noop(value: Any) -> bool:
    # Default/empty values ask for nothing: `echo: false`, `tools: []`, penalties of 0.
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, dict)):
        return len(value) == 0
    return isinstance(value, (int, float)) and value == 0


# Values of a field that are equivalent to leaving it out, where the generic rule is wrong.
_NOOP: Final[Mapping[tuple[type[BaseModel], str], Callable[[Any], bool]]] = {
    # For completions, logprobs=0 asks for the sampled token's logprob: a real request.
    (CompletionRequest, "logprobs"): lambda v: v is None,
    (CompletionRequest, "best_of"): lambda v: v is None or v == 1,
    (ChatCompletionRequest, "tool_choice"): lambda v: v in (None, "none", "auto"),
    (ChatCompletionRequest, "function_call"): lambda v: v in (None, "none", "auto"),
    (ChatCompletionRequest, "response_format"): lambda v: v is None or v == {"type": "text"},
    (ChatCompletionRequest, "modalities"): lambda v: v is None or v == ["text"],
    (ChatCompletionRequest, "add_generation_prompt"): lambda v: v is None or v is True,
}
# vLLM's sampling fields whose defaults the generic rule does not know (both endpoints).
_VLLM_NOOP: Final[Mapping[str, Callable[[Any], bool]]] = {
    "top_k": lambda v: v is None or v in (0, -1),  # vLLM: 0 and -1 both mean "all tokens"
    "repetition_penalty": lambda v: v is None or v == 1,
    "length_penalty": lambda v: v is None or v == 1,
    # prompt_logprobs=0 asks for the prompt tokens' own logprobs: a real request.
    "prompt_logprobs": lambda v: v is None,
}


def unsupported_fields(request: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """The known fields of `request` that ask for something a nudged model cannot do."""
    found: list[str] = []
    for name in request.UNSUPPORTED_FOR_NUDGING + request.VLLM_FIELDS:
        is_noop = _NOOP.get((type(request), name)) or _VLLM_NOOP.get(name, _generic_noop)
        # vLLM's fields are extra fields: absent unless the client sent them.
        if not is_noop(getattr(request, name, None)):
            found.append(name)
    return found


# --- Tokenizer requests (vLLM's /tokenize and /detokenize) ---------------------------------
#
# `model` is optional, as in vLLM: a proxy serving one model knows which tokenizer is meant.
# Fields follow vLLM's; unknown ones are kept and forwarded, as the upstream may know them.


class TokenizeCompletionRequest(OpenAIRequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIRequestModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template writes the special tokens itself.
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def tokenize_request_type(body: Any) -> type[TokenizeCompletionRequest | TokenizeChatRequest]:
    """vLLM's form of a /tokenize body: the chat form when it has `messages`."""
    return TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeCompletionRequest


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body, turning validation errors into an OpenAI 400."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


# --- Responses ---------------------------------------------------------------------------


class _ResponseModel(BaseModel):
    """Response models serialize every field, nulls included (OpenAI sends
    `finish_reason: null` and `logprobs: null`), except the keys listed here."""

    # Dropped when None.
    omit_if_none: ClassVar[frozenset[str]] = frozenset()
    # Dropped when None unless set explicitly (streamed `usage`: null in every chunk only
    # when the client asked for a usage chunk, as OpenAI and vLLM do).
    omit_if_unset_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in self.omit_if_none:
            if key in data and data[key] is None:
                del data[key]
        for key in self.omit_if_unset_none:
            if key in data and data[key] is None and key not in self.model_fields_set:
                del data[key]
        return data


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def new_chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class UsageInfo(_ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SpanReport(_ResponseModel):
    text: str
    source: Literal["base", "nudging"]


class TokenSource(_ResponseModel):
    """Who wrote one token of a nudged answer's logprobs, and the base's top-1 probability at
    its position when the base was asked there (a base token's own; for a nudger token, the
    base's probe or uncertain token it was written over; null where the base was not asked)."""

    source: Literal["base", "nudging"]
    base_top_prob: float | None = None


class NudgingReport(_ResponseModel):
    """The per-choice `nudging` extension of a response, when the request asks for it (and
    always when the choice fell back to the base model)."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"fallback", "fallback_reason", "token_sources"})

    spans: list[SpanReport] | None = None
    tokens: dict[str, int] = Field(default_factory=dict)
    nudging_word_ratio: float = 0.0
    rounds: int = 0
    upstream_requests: dict[str, int] = Field(default_factory=dict)
    # `fast`: base tokens held back while a chunk guard could still drop them.
    held_tokens: int = 0
    stop_reason: str | None = None
    fallback: Literal["base_only", "nudging_only"] | None = None
    fallback_reason: str | None = None
    # A nudged answer's logprobs were asked for: one entry per token of `logprobs`.
    token_sources: list[TokenSource] | None = None


class NudgingChunkSource(_ResponseModel):
    """The `nudging` extension of a streamed text chunk, when the request asks for provenance:
    which model wrote the chunk's text (each chunk is text of one model), and with logprobs,
    one entry per token of the chunk's `logprobs`."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"token_sources"})

    source: Literal["base", "nudging"]
    token_sources: list[TokenSource] | None = None


class _Choice(_ResponseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"nudging"})

    index: int
    # Passthrough models only: the upstream's logprobs (completions or chat shape).
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    # vLLM's: the stop string (or a passthrough upstream's stop token id) that ended the choice.
    stop_reason: str | int | None = None
    # The report on a whole answer and on a stream's last chunk; the source on its text chunks.
    nudging: NudgingReport | NudgingChunkSource | None = None


class CompletionChoice(_Choice):
    text: str


# A streamed completion chunk's choice has the same shape as a whole one.
CompletionStreamChoice = CompletionChoice


class CompletionResponse(_ResponseModel):
    # A passthrough upstream's build, as it sent it (vLLM: on whole answers and usage chunks).
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"system_fingerprint"})

    id: str = Field(default_factory=new_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    omit_if_unset_none: ClassVar[frozenset[str]] = frozenset({"usage"})


class ChatCompletionMessage(_ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # OpenAI's schema requires the key on a whole message (a stream's deltas may leave it out).
    refusal: str | None = None


class ChatCompletionChoice(_Choice):
    message: ChatCompletionMessage


class ChatCompletionResponse(_ResponseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"system_fingerprint"})

    id: str = Field(default_factory=new_chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(_ResponseModel):
    # The first chunk of a choice carries the role, the last one an empty delta.
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(_Choice):
    # vLLM's chat chunks carry `stop_reason` on a choice's finishing chunk only.
    omit_if_unset_none: ClassVar[frozenset[str]] = frozenset({"stop_reason"})

    delta: DeltaMessage


class ChatCompletionStreamResponse(_ResponseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"system_fingerprint"})
    omit_if_unset_none: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str = Field(default_factory=new_chat_completion_id)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "nudging-proxy"


class ModelList(_ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


__all__ = [
    "ChatCompletionChoice",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamChoice",
    "CompletionStreamResponse",
    "ContentPart",
    "DeltaMessage",
    "DetokenizeRequest",
    "ModelCard",
    "ModelList",
    "NudgingOptions",
    "NudgingReport",
    "SpanReport",
    "StreamOptions",
    "TokenSource",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenIds",
    "UsageInfo",
    "new_chat_completion_id",
    "new_completion_id",
    "parse_request",
    "tokenize_request_type",
    "unsupported_fields",
]
