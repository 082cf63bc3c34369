"""Logprobs on a nudged model, on the simulator stack over real HTTP: each token carries the
logprob and alternatives of the model that wrote it, in the OpenAI shapes (checked with the
`openai` package's types), whole and streamed, cut where stop strings and budgets cut the text,
and the `nudging` extension says per token who wrote it and how sure the base was there."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .conftest import BASE_PROMPT, NUDGER_PROMPT, scripted_pair
from .servers import running

PROMPT = "Why do leaves change color in autumn?\n"
# The nudger's prompt, given explicitly so the test can ask the aligned model itself.
NUDGING_PROMPT = f"<|im_start|>user\n{PROMPT.strip()}<|im_end|>\n<|im_start|>assistant\n"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT.strip()}]
THRESHOLD = 0.4
LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class Stack:
    def __init__(self, proxy: str, base: str, aligned: str) -> None:
        self.proxy, self.base, self.aligned = proxy, base, aligned


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as stack:
        base, aligned = (stack.enter_context(running(create_simulator(profile, time_scale=0)))
                         for profile in ("base", "aligned"))
        pair: dict[str, Any] = {
            "base": {"url": base + "/v1", "model": "base"},
            "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"},
            "threshold": THRESHOLD,
        }
        config = parse_config({"models": [
            {"name": "nudged", **pair},
            {"name": "nudged-paper", **pair, "strategy": "paper"},
            {"name": "ensemble", "method": "ensemble", **pair},
            # Its nudger is down (nothing listens on the discard port): it answers with the base.
            {"name": "fallback", "on_nudger_failure": "base_only", "retries": 0, "base": pair["base"],
             "nudging": {**pair["nudging"], "url": "http://127.0.0.1:9/v1"}},
        ]})
        yield Stack(stack.enter_context(running(create_proxy(config))), base, aligned)


def _completion(stack: Stack, model: str = "nudged", **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
            "nudging": {"nudging_prompt": NUDGING_PROMPT, "return_provenance": True}, **fields}
    response = httpx.post(stack.proxy + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    Completion.model_validate(payload, strict=True)
    return payload


def _chunks(stack: Stack, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", stack.proxy + path, json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def _streamed_completion(stack: Stack, model: str = "nudged", **fields: Any) -> dict[str, Any]:
    """A streamed completion's choice joined as one, each chunk checked against the schema."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
            "nudging": {"nudging_prompt": NUDGING_PROMPT, "return_provenance": True}, **fields}
    joined: dict[str, Any] = {"text": "", "logprobs": {key: [] for key in LOGPROB_KEYS}, "token_sources": []}
    for chunk in _chunks(stack, "/v1/completions", body):
        # The SDK's `Completion` cannot say "unfinished": OpenAI streams null until the end.
        Completion.model_validate({**chunk, "choices": [
            {**choice, "finish_reason": choice["finish_reason"] or "stop"} for choice in chunk["choices"]]},
            strict=True)
        for choice in chunk["choices"]:
            joined["text"] += choice["text"]
            if choice["text"]:
                # Each text chunk carries the logprobs of exactly its tokens.
                assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
                joined["token_sources"] += choice["nudging"]["token_sources"]
            for key in LOGPROB_KEYS:
                joined["logprobs"][key] += (choice["logprobs"] or {}).get(key) or []
    return joined


def _ask(url: str, model: str, prompt: str, k: int) -> dict[str, Any]:
    """The next token's logprobs, as the upstream itself gives them."""
    response = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": k})
    logprobs: dict[str, Any] = response.json()["choices"][0]["logprobs"]
    return logprobs


def test_each_token_carries_the_logprobs_of_the_model_that_wrote_it(stack: Stack) -> None:
    choice = _completion(stack, logprobs=3)["choices"][0]
    logprobs, report = choice["logprobs"], choice["nudging"]
    text = choice["text"]
    assert "".join(logprobs["tokens"]) == text
    assert len(logprobs["tokens"]) == len(report["token_sources"]) > 0
    assert {entry["source"] for entry in report["token_sources"]} == {"base", "nudging"}
    compared = []
    for index, (token, offset, entry) in enumerate(
            zip(logprobs["tokens"], logprobs["text_offset"], report["token_sources"], strict=True)):
        assert text[offset:offset + len(token)] == token
        url, model, prompt = ((stack.base, "base", PROMPT) if entry["source"] == "base"
                              else (stack.aligned, "aligned", NUDGING_PROMPT))
        own = _ask(url, model, prompt + text[:offset], 3)
        if own["tokens"][0] != token:
            continue  # a token cut at a word boundary or one the upstream splits differently
        assert logprobs["token_logprobs"][index] == pytest.approx(own["token_logprobs"][0]), (index, token)
        assert logprobs["top_logprobs"][index] == pytest.approx(own["top_logprobs"][0])
        compared.append(entry["source"])
        if entry["source"] == "base":
            assert entry["base_top_prob"] == pytest.approx(math.exp(max(own["top_logprobs"][0].values())))
    assert set(compared) == {"base", "nudging"} and len(compared) > len(logprobs["tokens"]) // 2


def test_the_report_shows_why_the_aligned_model_took_over(stack: Stack) -> None:
    sources = _completion(stack, logprobs=1)["choices"][0]["nudging"]["token_sources"]
    nudged_known = [entry["base_top_prob"] for entry in sources
                    if entry["source"] == "nudging" and entry["base_top_prob"] is not None]
    # Where the base was asked and the nudger wrote, the base was unsure.
    assert nudged_known and all(prob < THRESHOLD for prob in nudged_known)
    assert all(entry["base_top_prob"] is not None for entry in sources if entry["source"] == "base")


@pytest.mark.parametrize("model", ["nudged", "nudged-paper"])
def test_the_text_is_the_same_with_and_without_logprobs(stack: Stack, model: str) -> None:
    plain = _completion(stack, model)["choices"][0]
    assert plain["logprobs"] is None and "token_sources" not in plain["nudging"]
    with_logprobs = _completion(stack, model, logprobs=5)["choices"][0]
    assert with_logprobs["text"] == plain["text"]
    assert with_logprobs["nudging"]["spans"] == plain["nudging"]["spans"]


def test_fast_and_paper_give_the_same_logprobs(stack: Stack) -> None:
    fast, paper = (_completion(stack, model, logprobs=2)["choices"][0]
                   for model in ("nudged", "nudged-paper"))
    assert fast["text"] == paper["text"]
    assert fast["logprobs"] == paper["logprobs"]
    assert fast["nudging"]["token_sources"] == paper["nudging"]["token_sources"]


@pytest.mark.parametrize("model", ["nudged", "nudged-paper"])
def test_a_stream_carries_the_logprobs_of_its_chunks(stack: Stack, model: str) -> None:
    whole = _completion(stack, model, logprobs=2)["choices"][0]
    streamed = _streamed_completion(stack, model, logprobs=2)
    assert streamed["text"] == whole["text"]
    assert streamed["logprobs"] == whole["logprobs"]
    assert streamed["token_sources"] == whole["nudging"]["token_sources"]


@pytest.mark.parametrize("cut", [{"max_tokens": 7}, {"max_tokens": 3}, {"stop": ["the"]}])
def test_budgets_and_stop_strings_cut_the_logprobs_with_the_text(stack: Stack, cut: dict[str, Any]) -> None:
    full = _completion(stack, logprobs=1)["choices"][0]
    body = _completion(stack, logprobs=1, **cut)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] and full["text"].startswith(choice["text"])
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["tokens"]) == body["usage"]["completion_tokens"]
    assert len(choice["nudging"]["token_sources"]) == len(logprobs["tokens"])
    kept = len(logprobs["tokens"])
    assert logprobs["token_logprobs"] == full["logprobs"]["token_logprobs"][:kept]
    streamed = _streamed_completion(stack, logprobs=1, **cut)
    assert streamed["text"] == choice["text"] and streamed["logprobs"] == logprobs


def test_logprobs_zero_gives_each_token_alone(stack: Stack) -> None:
    logprobs = _completion(stack, logprobs=0)["choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[token] for token in logprobs["tokens"]]


def test_chat_logprobs_in_the_openai_shape(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.proxy + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="nudged", messages=MESSAGES, max_tokens=30, temperature=0,
                                          logprobs=True, top_logprobs=3,
                                          extra_body={"nudging": {"return_provenance": True}})
    choice = chat.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert bytes(entry.bytes or []).decode() == entry.token
        assert 1 <= len(entry.top_logprobs) <= 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-9
    report = (choice.model_extra or {})["nudging"]
    assert len(report["token_sources"]) == len(content)
    assert {entry["source"] for entry in report["token_sources"]} == {"base", "nudging"}
    body = {"model": "nudged", "messages": MESSAGES, "max_tokens": 30, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    streamed = []
    for chunk in _chunks(stack, "/v1/chat/completions", body):
        ChatCompletionChunk.model_validate(chunk, strict=True)
        for chunk_choice in chunk["choices"]:
            if chunk_choice["delta"].get("content"):
                chunk_content = chunk_choice["logprobs"]["content"]
                assert "".join(entry["token"] for entry in chunk_content) == chunk_choice["delta"]["content"]
                streamed += chunk_content
    whole = httpx.post(stack.proxy + "/v1/chat/completions", json=body, timeout=30).json()
    ChatCompletion.model_validate(whole, strict=True)
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert [entry.model_dump() for entry in content] == streamed


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_more_logprobs_than_the_upstreams_give_is_a_400(
        stack: Stack, path: str, fields: dict[str, Any], param: str) -> None:
    prompt = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    response = httpx.post(stack.proxy + path, json={"model": "nudged", **prompt, **fields}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_baselines_still_refuse_logprobs(stack: Stack) -> None:
    response = httpx.post(stack.proxy + "/v1/completions", timeout=30,
                          json={"model": "ensemble", "prompt": PROMPT, "logprobs": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize(("asked", "base_k", "nudger_k"), [(None, 1, 1), (0, 1, 0), (3, 3, 3)])
def test_the_upstreams_are_asked_for_the_client_s_k(
        asked: int | None, base_k: int, nudger_k: int) -> None:
    # The base's top-1 decides nudging, so it gets at least 1; neither gets more than asked.
    with scripted_pair() as pair:
        config = parse_config({"models": [{
            "name": "nudged", "base": {"url": pair.base_url + "/v1", "model": "base"},
            "nudging": {"url": pair.nudger_url + "/v1", "model": "nudger", "chat_template": "chatml"}}]})
        with running(create_proxy(config)) as proxy:
            fields = {} if asked is None else {"logprobs": asked}
            response = httpx.post(proxy + "/v1/completions", timeout=30, json={
                "model": "nudged", "prompt": BASE_PROMPT, "max_tokens": 12,
                "nudging": {"nudging_prompt": NUDGER_PROMPT}, **fields})
            assert response.status_code == 200, response.text
    assert {request["logprobs"] for request in pair.base.requests} == {base_k}
    assert {request["logprobs"] for request in pair.nudger.requests} == {nudger_k}


def test_a_fallback_to_the_base_returns_the_base_s_logprobs(stack: Stack) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    fallen_back = _completion(stack, "fallback", **body)["choices"][0]
    assert fallen_back["nudging"]["fallback"] == "base_only"
    direct = httpx.post(stack.base + "/v1/completions", json={"model": "base", **body}, timeout=30).json()
    assert fallen_back["text"] == direct["choices"][0]["text"]
    assert fallen_back["logprobs"] == direct["choices"][0]["logprobs"]
