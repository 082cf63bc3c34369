"""Batched and token-id prompts on /v1/completions (vLLM's four prompt forms), over real sockets:
the proxy in front of the simulators (and a scripted upstream that records what it is sent)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator
from upstreams.simulator.tokenizer import reported_tokens, token_id

from .scripted import ScriptedUpstream
from .servers import running

PROMPTS = ["Why do leaves change color in autumn?\n", "How do bees make honey?\n"]
METHODS = ["nudged", "ensemble", "proxy-tuning", "base-only", "aligned-only"]


def token_ids(text: str) -> list[int]:
    """`text` as the simulator's /tokenize gives its token ids."""
    return [token_id(token) for token in reported_tokens(text)]


@dataclass
class Stack:
    proxy: str
    scripted: ScriptedUpstream

    def post(self, **body: Any) -> httpx.Response:
        return httpx.post(self.proxy + "/v1/completions", json={"max_tokens": 8, **body}, timeout=60)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    scripted = ScriptedUpstream("scripted")
    scripted.add("Hi", [(" there", 0.9)])
    with ExitStack() as stack:
        # Proxy tuning asks for the top 100 logprobs.
        base, aligned, aligned_base = (
            stack.enter_context(running(create_simulator(profile, time_scale=0, max_logprobs=100)))
            for profile in ("base", "aligned", "aligned-base"))
        recorder = stack.enter_context(running(scripted.app()))
        nowhere = stack.enter_context(running(FastAPI()))  # answers every request with a 404
        pair = {"base": {"url": base + "/v1", "model": "base"},
                "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}}
        config = parse_config({
            "server": {"limits": {"max_prompts": 4, "max_choices": 6}},
            "models": [
                {"name": "nudged", **pair},
                {"name": "ensemble", "method": "ensemble", **pair},
                {"name": "proxy-tuning", "method": "proxy_tuning", **pair,
                 "nudging_base": {"url": aligned_base + "/v1", "model": "aligned-base"}},
                {"name": "base-only", "method": "base_only", "base": pair["base"]},
                {"name": "aligned-only", "method": "nudging_only", "nudging": pair["nudging"]},
                {"name": "scripted", "method": "base_only",
                 "base": {"url": recorder + "/v1", "model": "scripted"}},
                {"name": "no-detokenizer", "base": {"url": nowhere + "/v1", "model": "x", "dialect": "vllm"},
                 "nudging": pair["nudging"]},
            ],
        })
        proxy = stack.enter_context(running(create_proxy(config)))
        yield Stack(proxy, scripted)


def answer(stack: Stack, **body: Any) -> dict[str, Any]:
    response = stack.post(**body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def streamed(stack: Stack, **body: Any) -> tuple[dict[int, str], dict[int, str | None], list[dict[str, Any]]]:
    """Each index's text and finish reason, and the usage chunks."""
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    usages: list[dict[str, Any]] = []
    with httpx.stream("POST", stack.proxy + "/v1/completions", timeout=60,
                      json={"max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
                            **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usages.append(chunk["usage"])
            for choice in chunk["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["finish_reason"] is not None:
                    finishes[choice["index"]] = choice["finish_reason"]
    return texts, finishes, usages


@pytest.mark.parametrize("model", METHODS)
def test_a_batch_answers_each_prompt_as_alone_indexed_prompt_times_n(stack: Stack, model: str) -> None:
    alone = [answer(stack, model=model, prompt=prompt, n=2) for prompt in PROMPTS]
    batch = answer(stack, model=model, prompt=PROMPTS, n=2)
    assert [choice["index"] for choice in batch["choices"]] == [0, 1, 2, 3]
    # Prompt i, choice j is index i * n + j; greedy choices of one prompt are equal.
    expected = [choice["text"] for single in alone for choice in single["choices"]]
    assert [choice["text"] for choice in batch["choices"]] == expected
    assert all(expected)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(single["usage"][key] for single in alone), key
    assert batch["usage"]["prompt_tokens"] > alone[0]["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("model", ["nudged", "base-only"])
def test_a_sampled_batch_gives_each_prompt_its_answers_for_the_seed(stack: Stack, model: str) -> None:
    sampled = {"n": 2, "seed": 7, "temperature": 1.0, "max_tokens": 24}
    alone = [answer(stack, model=model, prompt=prompt, **sampled) for prompt in PROMPTS]
    batch = answer(stack, model=model, prompt=PROMPTS, **sampled)
    expected = [choice["text"] for single in alone for choice in single["choices"]]
    assert [choice["text"] for choice in batch["choices"]] == expected
    assert expected[0] != expected[1]  # the choices of one prompt differ


@pytest.mark.parametrize("model", ["nudged", "base-only"])
def test_a_streamed_batch_carries_each_index_and_the_summed_usage(stack: Stack, model: str) -> None:
    whole = answer(stack, model=model, prompt=PROMPTS, n=2)
    texts, finishes, usages = streamed(stack, model=model, prompt=PROMPTS, n=2)
    assert texts == {choice["index"]: choice["text"] for choice in whole["choices"]}
    assert finishes == {choice["index"]: choice["finish_reason"] for choice in whole["choices"]}
    assert usages == [whole["usage"]]


def test_the_openai_sdk_sends_a_batch(stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=stack.proxy + "/v1", api_key="unused", max_retries=0)
    batch = sdk.completions.create(model="nudged", prompt=PROMPTS, n=2, max_tokens=8)
    alone = [sdk.completions.create(model="nudged", prompt=prompt, max_tokens=8) for prompt in PROMPTS]
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert [choice.text for choice in batch.choices] == [
        single.choices[0].text for single in alone for _ in range(2)]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    assert batch.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone if a.usage)


@pytest.mark.parametrize("model", ["nudged", "ensemble", "proxy-tuning"])
def test_nudged_models_read_token_ids_as_the_base_detokenizes_them(stack: Stack, model: str) -> None:
    texts = [answer(stack, model=model, prompt=prompt)["choices"][0]["text"] for prompt in PROMPTS]
    one = answer(stack, model=model, prompt=token_ids(PROMPTS[0]))
    assert [choice["text"] for choice in one["choices"]] == texts[:1]
    batch = answer(stack, model=model, prompt=[token_ids(prompt) for prompt in PROMPTS])
    assert [choice["text"] for choice in batch["choices"]] == texts


def test_passthrough_models_forward_token_ids_unchanged(stack: Stack) -> None:
    ids = [ord(char) for char in "Hi"]  # the scripted upstream reads a token id as a character
    one = answer(stack, model="scripted", prompt=ids)
    assert stack.scripted.requests[-1]["prompt"] == ids
    assert one["choices"][0]["text"] == " there"
    batch = answer(stack, model="scripted", prompt=[ids, ids])
    assert [request["prompt"] for request in stack.scripted.requests[-2:]] == [ids, ids]
    assert [choice["text"] for choice in batch["choices"]] == [" there", " there"]


def test_token_ids_without_a_detokenizer_are_a_400_naming_prompt(stack: Stack) -> None:
    response = stack.post(model="no-detokenizer", prompt=[1, 2, 3])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert "detokenize" in response.json()["error"]["message"]


@pytest.mark.parametrize("prompt", [[], [""], ["a", ""], ["a", 1], [1, "a"], [-1], [[1], []], [[]], [[-1]],
                                    [[1], "a"]])
@pytest.mark.parametrize("model", ["nudged", "base-only"])
def test_malformed_prompt_lists_are_a_400_naming_prompt(stack: Stack, model: str, prompt: Any) -> None:
    response = stack.post(model=model, prompt=prompt)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == "prompt"


def test_a_batch_stays_within_the_request_limits(stack: Stack) -> None:
    too_many = stack.post(model="base-only", prompt=["a"] * 5)
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "prompt"
    too_many_choices = stack.post(model="base-only", prompt=["a"] * 4, n=2)
    assert too_many_choices.status_code == 400
    assert too_many_choices.json()["error"]["param"] == "n"
    assert stack.post(model="base-only", prompt=["a"] * 3, n=2).status_code == 200
    # One nudger prompt belongs to one prompt.
    shared = stack.post(model="nudged", prompt=PROMPTS, nudging={"nudging_prompt": "x"})
    assert shared.status_code == 400
    assert shared.json()["error"]["param"] == "nudging.nudging_prompt"
