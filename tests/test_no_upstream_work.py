"""A request that deserves a 400 gets it before any upstream request: every limit, every field a
nudged model cannot honour, the `max_tokens` cap and bad messages, also with `chat_template:
auto` (whose rendering is itself an upstream request) and for chat passthrough (the limits and
the cap)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from nudging_core.config import parse_config
from server.app import create_app

from .conftest import USER, scripted_pair
from .servers import running
from .test_limits import LIMITS, OVER_LIMIT, chat, completion, user


@dataclass
class Counted:
    """An upstream app that notes the path of every HTTP request it receives."""

    app: ASGIApp
    paths: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Proxy:
    url: str
    upstreams: tuple[Counted, Counted]

    def upstream_requests(self) -> list[str]:
        return [path for upstream in self.upstreams for path in upstream.paths]

    def forget(self) -> None:
        for upstream in self.upstreams:
            upstream.paths.clear()


MODELS = ("nudged", "nudged-auto")


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    with ExitStack() as stack:
        pair = stack.enter_context(scripted_pair())
        base, nudger = Counted(pair.base.app()), Counted(pair.nudger.app())
        base_url = stack.enter_context(running(base)) + "/v1"
        nudger_url = stack.enter_context(running(nudger)) + "/v1"
        config = parse_config({"server": {"limits": LIMITS}, "models": [
            {"name": name, "base": {"url": base_url, "model": "base"},
             "nudging": {"url": nudger_url, "model": "nudger", "chat_template": template},
             "max_tokens_limit": 1000, "default_max_tokens": 100}
            for name, template in zip(MODELS, ("chatml", "auto"), strict=True)
        ] + [
            {"name": "aligned-chat", "method": "nudging_only", "max_tokens_limit": 1000,
             "nudging": {"url": nudger_url, "model": "nudger", "chat_template": "auto"}},
        ]})
        yield Proxy(stack.enter_context(running(create_app(config))), (base, nudger))


UNSUPPORTED = [
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
    ("chat/completions", chat(logit_bias={"1": 1}), "logit_bias"),
    ("chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat/completions", chat(presence_penalty=0.5), "presence_penalty"),
    ("chat/completions", chat(ignore_eos=True), "ignore_eos"),
    ("chat/completions", chat(repetition_penalty=1.3), "repetition_penalty"),
    ("completions", completion(min_tokens=4), "min_tokens"),
    ("completions", completion(top_k=20), "top_k"),
    ("completions", completion(echo=True), "echo"),
    ("completions", completion(suffix="!"), "suffix"),
    ("completions", completion(logprobs=21), "logprobs"),
    ("completions", completion(best_of=2), "best_of"),
]
BAD_INPUT = [
    ("completions", completion(prompt=["a", ""]), "prompt"),
    ("completions", completion(prompt=["a", "b"], nudging={"nudging_prompt": "x"}), "nudging.nudging_prompt"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages"),
    ("chat/completions", chat(messages=[user("a"), {"role": "assistant", "content": None, "tool_calls": "x"},
                                        user("b")]), "messages"),
]
CASES = [
    pytest.param(endpoint, {**body, "model": model}, param, id=f"{model}-{endpoint}-{param}-{index}")
    for model in MODELS
    for index, (endpoint, body, param) in enumerate(OVER_LIMIT + UNSUPPORTED + BAD_INPUT)
] + [
    pytest.param(endpoint, {**body, "model": "aligned-chat"}, param, id=f"aligned-chat-{param}-{index}")
    for index, (endpoint, body, param) in enumerate(OVER_LIMIT) if endpoint == "chat/completions"
]


@pytest.mark.parametrize(("endpoint", "body", "param"), CASES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_400_costs_no_upstream_request(
    proxy: Proxy, endpoint: str, body: dict[str, Any], param: str, stream: bool
) -> None:
    proxy.forget()
    response = httpx.post(f"{proxy.url}/v1/{endpoint}", json={**body, "stream": stream}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert proxy.upstream_requests() == []


@pytest.mark.parametrize("model", MODELS)
def test_the_count_sees_a_valid_request_s_upstream_requests(proxy: Proxy, model: str) -> None:
    proxy.forget()
    response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                          json={"model": model, "messages": [user(USER)], "max_tokens": 5})
    assert response.status_code == 200, response.text
    requests = proxy.upstream_requests()
    assert "/v1/completions" in requests
    if model == "nudged-auto":
        assert "/tokenize" in requests  # the upstream renders the chat template
