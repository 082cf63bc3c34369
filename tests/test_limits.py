"""Input limits (`server.limits`, `max_tokens_limit`): a 400 naming the field, 413 for the body."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from nudging_core.config import LimitsConfig, parse_config
from nudging_core.errors import APIError
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest
from nudging_core.service.limits import check_limits
from server.app import create_app

from .conftest import USER, scripted_pair
from .servers import running

LIMITS = {"max_body_bytes": 20_000, "max_messages": 3, "max_message_chars": 100, "max_prompt_chars": 250,
          "max_n": 2, "max_stop": 4, "max_stop_chars": 10, "max_prompts": 3, "max_choices": 4}


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    with ExitStack() as stack:
        pair = stack.enter_context(scripted_pair())
        base_url, nudger_url = pair.base_url, pair.nudger_url
        config = parse_config({"server": {"limits": LIMITS}, "models": [
            {"name": "nudged", "base": {"url": base_url + "/v1", "model": "base"},
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "chatml"},
             "max_tokens_limit": 1000, "default_max_tokens": 100},
        ]})
        yield stack.enter_context(running(create_app(config)))


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "nudged", "messages": [{"role": "user", "content": USER}], **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "nudged", "prompt": USER, **extra}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


OVER_LIMIT = [
    ("chat/completions", chat(n=3), "n"),
    ("completions", completion(n=3), "n"),
    ("chat/completions", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat/completions", chat(stop="x" * 11), "stop"),
    ("completions", completion(stop=["ok", "y" * 11]), "stop"),
    ("chat/completions", chat(messages=[user("a"), user("b"), user("c"), user("d")]), "messages"),
    ("chat/completions", chat(messages=[user("x" * 101)]), "messages.0.content"),
    ("chat/completions", chat(messages=[user("a"), {"role": "user", "content": [
        {"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 41}]}]), "messages.1.content"),
    ("chat/completions", chat(messages=[user("x" * 90), user("y" * 90), user("z" * 90)]), "messages"),
    ("completions", completion(prompt="x" * 251), "prompt"),
    ("completions", completion(prompt=["x" * 251]), "prompt"),
    ("completions", completion(prompt=["x" * 200, "y" * 51]), "prompt"),  # a batch's characters together
    ("completions", completion(prompt=["a"] * 4), "prompt"),
    ("completions", completion(prompt=["a"] * 3, n=2), "n"),  # 6 choices
    ("completions", completion(nudging={"nudging_prompt": "x" * 251}), "nudging.nudging_prompt"),
    ("completions", completion(max_tokens=1001), "max_tokens"),
    ("chat/completions", chat(max_tokens=1001), "max_tokens"),
    ("chat/completions", chat(max_completion_tokens=1001), "max_completion_tokens"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), OVER_LIMIT)
def test_over_a_limit_is_a_400_naming_the_field(
    proxy: str, endpoint: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{proxy}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_at_the_limits_the_request_is_served(proxy: str) -> None:
    body = chat(n=2, stop=["0123456789", "b" * 10, "c" * 10, "d" * 10], max_tokens=1000)
    response = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_a_body_over_the_limit_is_a_413(proxy: str) -> None:
    padding = "x" * 20_000  # an unknown field: only the body's size is wrong
    declared = httpx.post(f"{proxy}/v1/chat/completions", json=chat(padding=padding), timeout=30)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size shows while reading
        yield b'{"model": "nudged", "padding": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    streamed = httpx.post(f"{proxy}/v1/completions", content=chunks(), timeout=30,
                          headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "max_body_bytes" in error["message"]
    # A body just under the limit is read and served.
    fits = chat(padding="x" * 19_000)
    assert httpx.post(f"{proxy}/v1/chat/completions", json=fits, timeout=30).status_code == 200


def _param(request: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> str | None:
    try:
        check_limits(request, limits)
    except APIError as error:
        return error.param
    return None


def test_each_limit_is_inclusive() -> None:
    limits = LimitsConfig.model_validate(LIMITS)
    at_limit = ChatCompletionRequest.model_validate(chat(
        n=2, stop=["x" * 10] * 4,
        messages=[user("x" * 100), user("y" * 100),
                  {"role": "user", "content": [{"type": "text", "text": "z" * 50}]}],
    ))
    assert _param(at_limit, limits) is None
    assert _param(CompletionRequest.model_validate(completion(prompt="x" * 250)), limits) is None
    assert _param(CompletionRequest.model_validate(completion(prompt=["a"] * 3)), limits) is None
    assert _param(CompletionRequest.model_validate(completion(prompt=["a", "b"], n=2)), limits) is None
    assert _param(CompletionRequest.model_validate(completion(prompt=[1] * 251)), limits) == "prompt"
