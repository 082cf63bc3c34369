"""A passthrough model answers what its upstream answered: text, logprobs, finish and stop
reasons, with `echo` and stop strings, whole and streamed. The proxy's answer is compared
field by field with the simulator's own answer to the same request, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
    # lm-eval's log-likelihood: the prompt's logprobs, no completion.
    "echo_no_tokens": {"max_tokens": 0, "logprobs": 1, "echo": True},
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


def _streamed(url: str, model: str, request: dict[str, Any], path: str = "/v1/completions",
              ) -> list[dict[str, Any]]:
    body = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **({"prompt": PROMPT} if path == "/v1/completions" else {}), **request}
    with httpx.stream("POST", url + path, json=body, timeout=30) as response:
        assert response.status_code == 200
        return [json.loads(line[5:]) for line in response.iter_lines()
                if line.startswith("data:") and line.strip() != "data: [DONE]"]


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's choice as one: its text and logprobs joined, its last reasons, and the
    fingerprint of its usage chunk."""
    joined: dict[str, Any] = {"text": "", "logprobs": None, "finish_reason": None, "stop_reason": None,
                              "system_fingerprint": None}
    for chunk in chunks:
        joined["system_fingerprint"] = chunk.get("system_fingerprint") or joined["system_fingerprint"]
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
    direct = _whole(simulator, "base", REQUESTS[name])
    passed = _whole(proxy, "base-only", REQUESTS[name])
    assert passed["system_fingerprint"] == direct["system_fingerprint"] == "nudging-proxy-simulator-base"
    assert {key: passed["choices"][0][key] for key in CHOICE_FIELDS} == {
        key: direct["choices"][0][key] for key in CHOICE_FIELDS}


@pytest.mark.parametrize("name", REQUESTS)
def test_streamed_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    assert _joined(_streamed(proxy, "base-only", REQUESTS[name])) == _joined(
        _streamed(simulator, "base", REQUESTS[name]))


@pytest.mark.parametrize("request_body", [{"max_tokens": 0}, {"max_tokens": 0, "echo": False}])
def test_no_tokens_without_echo_is_a_400(urls: tuple[str, str], request_body: dict[str, Any]) -> None:
    # As vLLM: only an echo may ask for no tokens.
    response = httpx.post(urls[1] + "/v1/completions", timeout=30,
                          json={"model": "base-only", "prompt": PROMPT, **request_body})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


CHAT: dict[str, dict[str, Any]] = {
    "logprobs": {"max_tokens": 6, "logprobs": True, "top_logprobs": 2},
    "stop": {"max_tokens": 12, "logprobs": True, "top_logprobs": 1, "stop": ["sky"]},
    "sampled_token_only": {"max_tokens": 4, "logprobs": True},
}


def _chat_as_completion(request: dict[str, Any]) -> dict[str, Any]:
    """The completions request a chat request on the passthrough becomes: the base prompt of
    one user message is its text and a newline; chat's top_logprobs is logprobs."""
    fields = {key: value for key, value in request.items() if key not in ("logprobs", "top_logprobs")}
    return {**fields, "logprobs": request.get("top_logprobs", 0)}


def _assert_chat_logprobs(chat: dict[str, Any], completion: dict[str, Any], top_k: int) -> None:
    """Chat logprobs are the completions ones, per token: its text, logprob, UTF-8 bytes and the
    `top_k` likeliest alternatives, likeliest first."""
    content = chat["content"]
    assert [entry["token"] for entry in content] == completion["tokens"]
    assert [entry["logprob"] for entry in content] == completion["token_logprobs"]
    for entry, top in zip(content, completion["top_logprobs"], strict=True):
        assert entry["bytes"] == list(entry["token"].encode())
        ranked = sorted(top.items(), key=lambda item: -item[1])[:top_k]
        assert [(t["token"], t["logprob"], t["bytes"]) for t in entry["top_logprobs"]] == [
            (token, value, list(token.encode())) for token, value in ranked]


@pytest.mark.parametrize("name", CHAT)
def test_chat_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    request = CHAT[name]
    direct = _whole(simulator, "base", _chat_as_completion(request))
    response = httpx.post(proxy + "/v1/chat/completions", timeout=30, json={
        "model": "base-only", "messages": [{"role": "user", "content": PROMPT.strip()}], "temperature": 0,
        **request})
    assert response.status_code == 200, response.text
    passed = response.json()
    choice, expected = passed["choices"][0], direct["choices"][0]
    assert passed["system_fingerprint"] == direct["system_fingerprint"]
    assert choice["message"]["content"] == expected["text"]
    reasons = ("finish_reason", "stop_reason")
    assert [choice[key] for key in reasons] == [expected[key] for key in reasons]
    _assert_chat_logprobs(choice["logprobs"], expected["logprobs"], request.get("top_logprobs", 0))


@pytest.mark.parametrize("name", CHAT)
def test_streamed_chat_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    request = CHAT[name]
    expected = _joined(_streamed(simulator, "base", _chat_as_completion(request)))
    chunks = _streamed(proxy, "base-only", {"messages": [{"role": "user", "content": PROMPT.strip()}],
                                            **request}, path="/v1/chat/completions")
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == expected["text"]
    content = [entry for choice in choices if choice["logprobs"] for entry in choice["logprobs"]["content"]]
    _assert_chat_logprobs({"content": content}, expected["logprobs"], request.get("top_logprobs", 0))
    finishing = [choice for choice in choices if choice["finish_reason"]]
    assert [(c["finish_reason"], c["stop_reason"]) for c in finishing] == [
        (expected["finish_reason"], expected["stop_reason"])]
    # vLLM's chat chunks name the stop reason on the finishing chunk only.
    assert all("stop_reason" not in choice for choice in choices if not choice["finish_reason"])
    assert chunks[-1]["system_fingerprint"] == expected["system_fingerprint"]


def test_openai_sdk_reads_passthrough_logprobs(urls: tuple[str, str]) -> None:
    simulator, proxy = urls
    direct = openai.OpenAI(base_url=simulator + "/v1", api_key="unused", max_retries=0)
    sdk = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    # lm-eval's log-likelihood request (the prompt's logprobs alone), and a plain one.
    for echo, max_tokens, top in ((True, 0, 1), (False, 5, 2)):
        expected, answer = (
            client.completions.create(model=model, prompt=PROMPT, temperature=0, echo=echo,
                                      max_tokens=max_tokens, logprobs=top)
            for client, model in ((direct, "base"), (sdk, "base-only")))
        logprobs, wanted = answer.choices[0].logprobs, expected.choices[0].logprobs
        assert logprobs is not None and wanted is not None
        assert logprobs.tokens == wanted.tokens and logprobs.token_logprobs == wanted.token_logprobs
        assert logprobs.top_logprobs == wanted.top_logprobs and logprobs.text_offset == wanted.text_offset
        assert answer.system_fingerprint == expected.system_fingerprint
    chat = sdk.chat.completions.create(
        model="base-only", messages=[{"role": "user", "content": PROMPT.strip()}], temperature=0,
        max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs and chat.choices[0].logprobs.content
    assert content and "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 for entry in content)


def overshooting_upstream() -> Starlette:
    """An upstream that writes three tokens whatever `max_tokens` says, in one stream event."""
    logprobs = {"tokens": [" a", " b", " c"], "token_logprobs": [-0.1, -0.2, -0.3],
                "top_logprobs": [{" a": -0.1}, {" b": -0.2}, {" c": -0.3}], "text_offset": [0, 2, 4]}

    async def completions(request: Request) -> Response:
        event = {"choices": [{"index": 0, "text": " a b c", "logprobs": logprobs, "finish_reason": "length",
                              "stop_reason": None}]}
        return Response(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n", media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", lambda request: JSONResponse({"data": [{"id": "m", "owned_by": "vllm"}]})),
        Route("/v1/completions", completions, methods=["POST"]),
    ])


def test_a_budget_cut_keeps_logprobs_aligned() -> None:
    # The budget is exact even when an upstream overshoots it: the logprobs end where the text does.
    with running(overshooting_upstream()) as upstream:
        config = parse_config({"models": [
            {"name": "base-only", "method": "base_only", "base": {"url": upstream + "/v1", "model": "m"}}]})
        with running(create_proxy(config)) as proxy:
            answer = httpx.post(proxy + "/v1/completions", timeout=30, json={
                "model": "base-only", "prompt": "x", "max_tokens": 2, "logprobs": 1}).json()["choices"][0]
    assert answer["text"] == " a b"
    assert answer["logprobs"] == {"tokens": [" a", " b"], "token_logprobs": [-0.1, -0.2],
                                  "top_logprobs": [{" a": -0.1}, {" b": -0.2}], "text_offset": [0, 2]}
