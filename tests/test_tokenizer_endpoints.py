"""vLLM's tokenizer endpoints on the proxy (`/tokenize`, `/detokenize`, `/tokenizer_info`), per
model name, answered by the model's base upstream (the aligned model's for `nudging_only`): the
proxy in front of simulators and of a server replaying real vLLM 0.32 answers, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running
from .test_vllm_fixtures import RENDERED_TOKENS, RecordedGemma, recorded

PROMPT = "Why do leaves change color in autumn?"
MESSAGES = [{"role": "user", "content": "Hi"}]


@dataclass
class Stack:
    proxy: str
    base: str
    aligned: str
    gemma: RecordedGemma


def upstream(url: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"url": url + "/v1", "model": model, **extra}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as stack:
        # Two context lengths tell which upstream answered.
        base = stack.enter_context(running(create_simulator("base", time_scale=0, max_model_len=2048)))
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0)))
        failing = stack.enter_context(running(create_simulator(
            "base", time_scale=0, faults="kind=tokenize:http_500")))
        slow = stack.enter_context(running(create_simulator("base", time_scale=0,
                                                            faults="kind=tokenize:delay=3")))
        gemma = RecordedGemma(with_template=True)
        gemma_url = stack.enter_context(running(gemma.app()))
        aligned_upstream = upstream(aligned, "aligned", chat_template="chatml")
        config = parse_config({"models": [
            {"name": "nudged", "base": upstream(base, "base"), "nudging": aligned_upstream},
            {"name": "base", "method": "base_only", "base": upstream(base, "base")},
            {"name": "aligned-only", "method": "nudging_only", "nudging": aligned_upstream},
            {"name": "gemma", "method": "base_only", "base": upstream(gemma_url, "gemma3-270m")},
            {"name": "failing", "method": "base_only", "base": upstream(failing, "base")},
            {"name": "slow", "method": "base_only",
             "base": upstream(slow, "base", timeouts={"first_byte": 0.5})},
        ]})
        proxy = stack.enter_context(running(create_proxy(config)))
        yield Stack(proxy, base, aligned, gemma)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(("model", "max_model_len"),
                         [("nudged", 2048), ("base", 2048), ("aligned-only", 4096)])
def test_tokenize_is_the_base_upstreams(stack: Stack, model: str, max_model_len: int) -> None:
    body = {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}
    tokenized = httpx.post(stack.proxy + "/tokenize", json={"model": model, **body})
    assert tokenized.status_code == 200
    direct = httpx.post(stack.base + "/tokenize", json=body).json()
    assert tokenized.json() == {**direct, "max_model_len": max_model_len}
    detokenized = httpx.post(stack.proxy + "/detokenize", json={"model": model, "tokens": direct["tokens"]})
    assert detokenized.json() == {"prompt": PROMPT}


def test_the_chat_form_is_forwarded(stack: Stack) -> None:
    # Real vLLM 0.32 (Gemma 3 with a chat template), replayed: its answer comes back whole.
    body = {"model": "gemma", "messages": MESSAGES, "add_generation_prompt": True}
    tokenized = httpx.post(stack.proxy + "/tokenize", json=body)
    assert tokenized.status_code == 200
    assert tokenized.text.strip() == recorded("tokenize_messages_with_template.json")[0].strip()
    assert stack.gemma.seen[-1] == {**body, "model": "gemma3-270m"}  # the upstream's own name
    detokenized = httpx.post(stack.proxy + "/detokenize", json={"model": "gemma", "tokens": RENDERED_TOKENS})
    assert detokenized.text.strip() == recorded("detokenize_messages_with_template.json")[0].strip()
    # The simulated models have no chat template: the upstream's refusal is the client's 400.
    refused = httpx.post(stack.proxy + "/tokenize", json={"model": "nudged", "messages": MESSAGES})
    error = error_of(refused, 400)
    assert "chat template" in error["message"] and "base model" in error["message"]


def test_tokenizer_info_names_its_model(stack: Stack) -> None:
    info = httpx.get(stack.proxy + "/tokenizer_info", params={"model": "nudged"})
    assert info.status_code == 200
    assert info.json() == httpx.get(stack.base + "/tokenizer_info").json()
    # Several models: a request naming none is ambiguous.
    assert error_of(httpx.get(stack.proxy + "/tokenizer_info"), 400)["param"] == "model"
    assert error_of(httpx.post(stack.proxy + "/detokenize", json={"tokens": [1]}), 400)["param"] == "model"


def test_tokenizer_info_an_upstream_does_not_serve(stack: Stack) -> None:
    # vLLM serves it only with --enable-tokenizer-info-endpoint (the replayed server has none).
    error = error_of(httpx.get(stack.proxy + "/tokenizer_info", params={"model": "gemma"}), 501)
    assert "/tokenizer_info" in error["message"] and "--enable-tokenizer-info-endpoint" in error["message"]
    assert "127.0.0.1" not in error["message"]


@pytest.mark.parametrize(("request_args"), [
    {"method": "POST", "url": "/tokenize", "json": {"model": "nope", "prompt": "x"}},
    {"method": "POST", "url": "/detokenize", "json": {"model": "nope", "tokens": [1]}},
    {"method": "GET", "url": "/tokenizer_info", "params": {"model": "nope"}},
])
def test_unknown_model(stack: Stack, request_args: dict[str, Any]) -> None:
    response = httpx.request(**{**request_args, "url": stack.proxy + request_args["url"]})
    error = error_of(response, 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"model": "base"}, "prompt"),
    ("/tokenize", {"model": "base", "prompt": 3}, "prompt"),
    ("/tokenize", {"model": "base", "messages": "hi"}, "messages"),
    ("/detokenize", {"model": "base", "tokens": ["a"]}, "tokens.0"),
    ("/detokenize", {"model": "base", "tokens": [-1]}, "tokens.0"),
])
def test_bad_requests_are_400s(stack: Stack, path: str, body: dict[str, Any], param: str) -> None:
    assert error_of(httpx.post(stack.proxy + path, json=body), 400)["param"] == param
    assert error_of(httpx.post(stack.proxy + path, content=b"{"), 400)["param"] is None


def test_upstream_failures_are_502_and_504(stack: Stack) -> None:
    failed = error_of(httpx.post(stack.proxy + "/tokenize", json={"model": "failing", "prompt": "x"}), 502)
    assert "base model" in failed["message"]
    timed_out = httpx.post(stack.proxy + "/tokenize", json={"model": "slow", "prompt": "x"}, timeout=10)
    assert error_of(timed_out, 504)["code"] == "upstream_timeout"


def test_one_model_needs_no_name() -> None:
    # lm-eval's remote tokenizer (`local-completions`, tokenizer_backend=remote) names no model.
    with running(create_simulator("base", time_scale=0)) as base:
        config = parse_config({"models": [{"name": "only", "method": "base_only",
                                           "base": upstream(base, "base")}]})
        with running(create_proxy(config)) as proxy:
            info = httpx.get(proxy + "/tokenizer_info")
            assert info.status_code == 200 and "eos_token" in info.json()
            tokens = httpx.post(proxy + "/tokenize", json={"prompt": "test", "add_special_tokens": False})
            direct = httpx.post(base + "/tokenize", json={"prompt": "test"}).json()
            assert tokens.json()["tokens"] == direct["tokens"]
            assert httpx.post(proxy + "/detokenize", json={"tokens": tokens.json()["tokens"]}).json() == {
                "prompt": "test"}
