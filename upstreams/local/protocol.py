"""Request parsing and error shapes of the local upstream (vLLM's flavour of the OpenAI API)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class ApiError(Exception):
    """A refused request, reported like vLLM: ``{"object": "error", "message", ...}``."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"object": "error", "message": self.message, "type": self.kind,
                "param": self.param, "code": self.status}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """Fields of ``POST /v1/completions``; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
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

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(f"this server takes one prompt per request; got {len(self.prompt)}",
                           param="prompt")
        return self.prompt[0]


def parse_completion_request(body: Any, max_logprobs: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise ApiError(describe_validation_error(error)) from None
    if (request.n or 1) > 1 or (request.best_of or 1) > 1:
        raise ApiError("only n=1 and best_of=1 are supported", param="n")
    if request.logprobs is not None and request.logprobs > max_logprobs:
        raise ApiError(f"Requested sample logprobs of {request.logprobs}, which is greater "
                       f"than max allowed: {max_logprobs}", param="logprobs")
    if request.echo and request.logprobs is not None:
        # Prompt logprobs need the logits of every prompt position, which defeats the KV
        # cache reuse this server is built around; echo alone is served.
        raise ApiError("echo with logprobs (prompt logprobs) is not supported by this server",
                       param="echo")
    if request.stream_options is not None and not request.stream:
        raise ApiError("Stream options can only be defined when `stream=True`.",
                       param="stream_options")
    return request


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def parse_body(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise ApiError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid value')}")
    return "invalid request: " + "; ".join(parts)


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int) -> ApiError:
    # vLLM's wording: clients (the proxy included) recognise "maximum context length".
    return ApiError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion.",
        param="prompt",
    )


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}
