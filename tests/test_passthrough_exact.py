"""A passthrough model answers what its upstream answered: text, logprobs, finish and stop
reasons, with `echo` and stop strings, whole and streamed. The proxy's answer is compared
field by field with the simulator's own answer to the same request, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

PROMPT = "Why is the sky blue?\n"
REQUESTS: dict[str, dict[str, Any]] = {
    "logprobs": {"max_tokens": 6, "logprobs": 2},
    "stop": {"max_tokens": 12, "logprobs": 2, "stop": ["sky"]},
    "echo": {"max_tokens": 3, "logprobs": 1, "echo": True},
    "echo_stop_in_prompt": {"max_tokens": 3, "logprobs": 1, "echo": True, "stop": ["\n"]},
    "echo_one_token": {"max_tokens": 1, "logprobs": 5, "echo": True},
    "no_logprobs_stop": {"max_tokens": 12, "stop": [" is"]},
}
CHOICE_FIELDS = ("text", "logprobs", "finish_reason", "stop_reason")


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        simulator = stack.enter_context(running(create_simulator("base", time_scale=0)))
        config = parse_config({"models": [
            {"name": "base-only", "method": "base_only", "base": {"url": simulator + "/v1", "model": "base"}},
        ]})
        yield simulator, stack.enter_context(running(create_proxy(config)))


def _whole(url: str, model: str, request: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url + "/v1/completions", timeout=30,
                          json={"model": model, "prompt": PROMPT, "temperature": 0, **request})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _streamed(url: str, model: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "stream": True, **request}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        return [json.loads(line[5:]) for line in response.iter_lines()
                if line.startswith("data:") and line.strip() != "data: [DONE]"]


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's choice as one: its text and logprobs joined, its last reasons."""
    joined: dict[str, Any] = {"text": "", "logprobs": None, "finish_reason": None, "stop_reason": None}
    for chunk in chunks:
        for choice in chunk["choices"]:
            joined["text"] += choice["text"]
            if choice["logprobs"] is not None:
                logprobs = joined["logprobs"] or {key: [] for key in choice["logprobs"]}
                joined["logprobs"] = {key: logprobs[key] + choice["logprobs"][key] for key in logprobs}
            for key in ("finish_reason", "stop_reason"):
                joined[key] = choice.get(key) or joined[key]
    return joined


@pytest.mark.parametrize("name", REQUESTS)
def test_whole_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    direct = _whole(simulator, "base", REQUESTS[name])["choices"][0]
    passed = _whole(proxy, "base-only", REQUESTS[name])["choices"][0]
    assert {key: passed.get(key) for key in CHOICE_FIELDS} == {key: direct[key] for key in CHOICE_FIELDS}


@pytest.mark.parametrize("name", REQUESTS)
def test_streamed_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    assert _joined(_streamed(proxy, "base-only", REQUESTS[name])) == _joined(
        _streamed(simulator, "base", REQUESTS[name]))
