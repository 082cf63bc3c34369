"""The vLLM flavour of the OpenAI completions protocol, as far as the simulator speaks it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SimulatorError(Exception):
    """A request the simulator refuses, reported like vLLM does."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"object": "error", "message": self.message, "type": self.kind, "param": None,
                "code": self.status}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """Fields of ``POST /v1/completions``; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float | None = Field(default=1.0, ge=0.0)
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
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        return [s for s in items if s]  # an empty stop string would stop everything

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise SimulatorError("the simulator serves one prompt per request; "
                                     f"got a list of {len(prompt)} prompts")
            return str(prompt[0])
        if not prompt:
            raise SimulatorError("prompt must not be an empty list")
        raise SimulatorError("token id prompts are not supported by the simulator; send text")

    def stop_strings(self) -> list[str]:
        stop = self.stop
        return list(stop) if isinstance(stop, list) else []


def parse_completion_request(body: Any, max_logprobs: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise SimulatorError("the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise SimulatorError(describe_validation_error(error)) from None
    if (request.n or 1) > 1 or (request.best_of or 1) > 1:
        raise SimulatorError("the simulator supports n=1 and best_of=1 only")
    if request.logprobs is not None and request.logprobs > max_logprobs:
        raise SimulatorError(f"Requested sample logprobs of {request.logprobs}, which is "
                             f"greater than max allowed: {max_logprobs}")
    if request.stream_options is not None and not request.stream:
        raise SimulatorError("Stream options can only be defined when `stream=True`.")
    return request


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid value')}")
    return "invalid request: " + "; ".join(parts)


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int) -> SimulatorError:
    return SimulatorError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion."
    )


def logprobs_block(
    tokens: list[str],
    token_logprobs: list[float | None],
    top_logprobs: list[dict[str, float] | None],
    text_offset: list[int],
) -> dict[str, Any]:
    return {
        "text_offset": text_offset,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": top_logprobs,
    }


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
