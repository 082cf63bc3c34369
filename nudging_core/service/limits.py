"""Input limits (config `server.limits`) on each field of a parsed request: a request over one
gets a 400 naming the field (`param`). The `max_tokens` cap is per model (`max_tokens_limit`)
and checked where the budget is chosen (plan.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nudging_core.config import LimitsConfig
from nudging_core.errors import APIError, invalid_request
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest


def _too_many(param: str, count: int, limit: int, what: str) -> APIError:
    return invalid_request(f"'{param}' has {count} {what}; the limit is {limit}.", param)


def _too_long(param: str, size: int, limit: int) -> APIError:
    return invalid_request(f"'{param}' is {size} characters long; the limit is {limit}.", param)


def _content_chars(message: Mapping[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content if isinstance(part.get("text"), str))
    return 0


def _prompt_chars(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(item) if isinstance(item, (str, list)) else 1 for item in prompt)


def _check_prompts(request: CompletionRequest, limits: LimitsConfig) -> None:
    """A batch is bounded as a whole: its prompts, its generations (prompts times n, which run
    at once) and its characters together."""
    count = len(request.prompts())
    if count > limits.max_prompts:
        raise _too_many("prompt", count, limits.max_prompts, "prompts")
    if count * request.n > limits.max_choices:
        raise invalid_request(
            f"{count} prompts with 'n' {request.n} ask for {count * request.n} choices; "
            f"the limit is {limits.max_choices}.",
            "n",
        )
    size = _prompt_chars(request.prompt)
    if size > limits.max_prompt_chars:
        raise _too_long("prompt", size, limits.max_prompt_chars)


def check_limits(request: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> None:
    """Raise a 400 naming the first field of `request` over one of `limits`."""
    if request.n > limits.max_n:
        raise invalid_request(f"'n' must be at most {limits.max_n}.", "n")
    stops = request.stop_list()
    if len(stops) > limits.max_stop:
        raise _too_many("stop", len(stops), limits.max_stop, "stop strings")
    for stop in stops:
        if len(stop) > limits.max_stop_chars:
            raise _too_long("stop", len(stop), limits.max_stop_chars)
    if request.nudging is not None and request.nudging.nudging_prompt is not None:
        size = len(request.nudging.nudging_prompt)
        if size > limits.max_prompt_chars:
            raise _too_long("nudging.nudging_prompt", size, limits.max_prompt_chars)
    if isinstance(request, CompletionRequest):
        _check_prompts(request, limits)
        return
    if len(request.messages) > limits.max_messages:
        raise _too_many("messages", len(request.messages), limits.max_messages, "messages")
    total = 0
    for index, message in enumerate(request.messages):
        size = _content_chars(message)
        if size > limits.max_message_chars:
            raise _too_long(f"messages.{index}.content", size, limits.max_message_chars)
        total += size
    if total > limits.max_prompt_chars:
        raise invalid_request(
            f"The messages have {total} characters together; the limit is {limits.max_prompt_chars}.",
            "messages",
        )
