"""`usage.completion_tokens` is the sum of the `nudging.tokens` the answer reports, for every
method and strategy, in whole answers and in streams, over the corpus prompts.

The proxy runs in front of the simulator trio over real sockets; some prompts carry stop
strings or a budget that binds, where pieces are cut and counts most easily drift apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from nudging_core.generation import PROMPT_COUNT_WAIT_SECONDS
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .corpus_prompts import CORPUS
from .servers import running

# A spread of the corpus (plain, system prompts, keywords, small budgets), and split characters.
PROMPTS = (*CORPUS[::8], *(prompt for prompt in CORPUS if prompt.name == "emoji"))
MODELS = ("fast", "paper", "fast-cleanup", "base_only", "nudging_only", "proxy_tuning", "ensemble")


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    with ExitStack() as stack:
        urls = {
            profile: stack.enter_context(running(create_simulator(profile, time_scale=0, max_logprobs=100)))
            + "/v1"
            for profile in ("base", "aligned", "aligned-base")
        }
        base = {"url": urls["base"], "model": "base"}
        aligned = {"url": urls["aligned"], "model": "aligned", "chat_template": "chatml"}
        config = parse_config({"models": [
            {"name": "fast", "base": base, "nudging": aligned, "strategy": "fast"},
            {"name": "paper", "base": base, "nudging": aligned, "strategy": "paper"},
            {"name": "fast-cleanup", "base": base, "nudging": aligned, "cleanup": True},
            {"name": "base_only", "method": "base_only", "base": base},
            {"name": "nudging_only", "method": "nudging_only", "nudging": aligned},
            {"name": "proxy_tuning", "method": "proxy_tuning", "base": base, "nudging": aligned,
             "nudging_base": {"url": urls["aligned-base"], "model": "aligned-base"}},
            {"name": "ensemble", "method": "ensemble", "base": base, "nudging": aligned},
        ]})
        yield stack.enter_context(running(create_proxy(config)))


def body(model: str, index: int, **extra: Any) -> dict[str, Any]:
    prompt = PROMPTS[index]
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
        {"role": "user", "content": prompt.user}]
    settings: dict[str, Any] = {"max_tokens": prompt.max_tokens}
    if index % 3 == 1:
        settings["stop"] = [". ", "\n\n"]
    if index % 3 == 2:
        settings["max_tokens"] = 37
    return {"model": model, "messages": messages, "nudging": {"return_provenance": True}, **settings, **extra}


def reported_tokens(reports: list[dict[str, Any]]) -> int:
    return sum(sum(report["tokens"].values()) for report in reports)


@pytest.mark.parametrize("model", MODELS)
def test_usage_is_the_sum_of_the_reported_tokens(proxy: str, model: str) -> None:
    for index in range(len(PROMPTS)):
        answer = httpx.post(proxy + "/v1/chat/completions", json=body(model, index, n=2), timeout=120)
        assert answer.status_code == 200, answer.text
        answer_body = answer.json()
        reports = [choice["nudging"] for choice in answer_body["choices"]]
        assert answer_body["usage"]["completion_tokens"] == reported_tokens(reports), PROMPTS[index].name
        assert answer_body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_streamed_usage_is_the_sum_of_the_reported_tokens(proxy: str, model: str) -> None:
    for index in range(len(PROMPTS)):
        request = body(model, index, stream=True, stream_options={"include_usage": True})
        reports: list[dict[str, Any]] = []
        usage: dict[str, int] | None = None
        with httpx.stream("POST", proxy + "/v1/chat/completions", json=request, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                # (Text chunks carry only their source; a choice's last chunk carries its report.)
                reports += [choice["nudging"] for choice in chunk["choices"]
                            if choice.get("nudging") and "tokens" in choice["nudging"]]
        assert usage is not None and reports
        assert usage["completion_tokens"] == reported_tokens(reports), PROMPTS[index].name


def test_a_stalled_tokenizer_does_not_hold_the_end_of_an_answer() -> None:
    # The base upstream's /tokenize answers after 30 s (past nothing but the read timeout).
    with ExitStack() as stack:
        base_url = stack.enter_context(running(create_simulator("base", time_scale=0)))
        aligned_url = stack.enter_context(running(create_simulator("aligned", time_scale=0)))
        config = parse_config({"models": [{
            "name": "fast", "base": {"url": base_url + "/v1", "model": "base"},
            "nudging": {"url": aligned_url + "/v1", "model": "aligned", "chat_template": "chatml"}}]})
        proxy_url = stack.enter_context(running(create_proxy(config)))
        assert httpx.post(base_url + "/faults", json={"faults": "kind=tokenize:delay=30"}).status_code == 200
        request = {"model": "fast", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        started = time.monotonic()
        answer = httpx.post(proxy_url + "/v1/chat/completions", json=request, timeout=60)
        took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    assert took < PROMPT_COUNT_WAIT_SECONDS + 3, took
