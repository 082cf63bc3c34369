"""Each upstream dialect against response fixtures in its server's own shape.

The llama-cpp-python fixtures were recorded from its server on SmolLM2-135M, the vLLM ones
from vLLM 0.32 on SmolLM2-135M-Instruct (scripts/vllm-cpu.sh: emoji, each split over three
tokens); the llama-server ones are written in the shape it documents, including a character
split across two tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from nudging_core.upstream import CompletionCall, UpstreamClient, UpstreamError

FIXTURES = Path(__file__).parent / "fixtures" / "dialects"
OWNERS = {"vllm": "vllm", "llama_server": "llamacpp", "llama_cpp_python": "me"}


def models_answer(kind: str) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "owned_by": OWNERS[kind]}]})


def transport(kind: str, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/models"):
            return models_answer(kind)
        body = json.loads(request.content)
        if body.get("stream"):
            return httpx.Response(200, text=(FIXTURES / f"{kind}_stream.txt").read_text(),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=json.loads((FIXTURES / f"{kind}_completion.json").read_text()))

    return httpx.MockTransport(handle)


def client(kind: str, seen: list[httpx.Request]) -> UpstreamClient:
    return UpstreamClient("http://upstream:8000/v1", "m", role="base", transport=transport(kind, seen))


CALL = CompletionCall(prompt="The capital of France is", max_tokens=5, logprobs=1)


async def test_vllm_whole_completion_texts_and_top_probabilities() -> None:
    seen: list[httpx.Request] = []
    upstream = client("vllm", seen)
    completion = await upstream.complete(CALL)
    texts = [token.text for token in completion.tokens]
    # vLLM 0.32 sends "" for each incomplete byte of a character and the whole character on
    # the token that completes it.
    assert texts == ["", "", " 💖", "", "", " 💐"]
    # Its top-k dicts collide where several tokens decode to "" ({"": -1.706} beside a
    # chosen "" at -0.456): top-1 is at least the chosen token's.
    assert completion.tokens[0].top_logprob == pytest.approx(-0.4561607539653778)
    assert completion.tokens[2].top_logprob == pytest.approx(-2.337090253829956)
    assert completion.finish_reason == "length"
    assert completion.prompt_tokens == 19
    assert seen[-1].url.path == "/v1/completions"
    await upstream.aclose()


@pytest.mark.parametrize("kind", ["llama_server"])
async def test_whole_completion_texts_and_top_probabilities(kind: str) -> None:
    seen: list[httpx.Request] = []
    upstream = client(kind, seen)
    completion = await upstream.complete(CALL)
    texts = [token.text for token in completion.tokens]
    assert "".join(texts) == (" Paris, the café" if kind == "vllm" else " Paris, café")
    assert texts[-2:] == ["", "é"], "a character split over two tokens is sent whole, once"
    assert completion.tokens[1].top_logprob == pytest.approx(-0.6), "top-1 is the best alternative"
    caf = next(token for token in completion.tokens if token.text == " caf")
    assert caf.top_logprob == pytest.approx(-0.8)
    assert completion.finish_reason == "length"
    assert completion.prompt_tokens == 6
    path = seen[-1].url.path
    assert path == ("/v1/completions" if kind == "vllm" else "/completion")
    await upstream.aclose()


async def test_vllm_streamed_tokens() -> None:
    upstream = client("vllm", [])
    async with upstream.stream(CALL) as stream:
        texts = [token.text async for token in stream]
    assert texts == ["", "", " 💖", "", "", " 💐", "", "", " 💑", "", "", " 💓"]
    assert stream.finish_reason == "length"
    await upstream.aclose()


@pytest.mark.parametrize(("kind", "finish"), [("llama_server", "stop")])
async def test_streamed_tokens(kind: str, finish: str) -> None:
    upstream = client(kind, [])
    async with upstream.stream(CALL) as stream:
        texts = [token.text async for token in stream]
    assert texts == [" Paris", "", "é"]
    assert stream.finish_reason == finish
    assert stream.prompt_tokens == 6
    await upstream.aclose()


async def test_request_bodies_per_dialect() -> None:
    seen: list[httpx.Request] = []
    call = CompletionCall(
        prompt="p", max_tokens=3, temperature=0.5, top_p=0.9, seed=4, logprobs=1, stop=("\n",)
    )
    for kind in ("vllm", "llama_server"):
        upstream = client(kind, seen)
        await upstream.complete(call)
        await upstream.aclose()
    vllm_body: dict[str, Any] = json.loads(seen[1].content)
    assert vllm_body == {"model": "m", "prompt": "p", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                         "stream": False, "logprobs": 1, "seed": 4, "stop": ["\n"]}
    server_body: dict[str, Any] = json.loads(seen[3].content)
    assert server_body == {"prompt": "p", "n_predict": 3, "temperature": 0.5, "top_p": 0.9, "stream": False,
                           "cache_prompt": True, "n_probs": 1, "seed": 4, "stop": ["\n"]}


def _recorded(name: str) -> bool:
    path = FIXTURES / name
    return path.exists() and path.stat().st_size > 0


@pytest.mark.skipif(not _recorded("llama_cpp_python_completion.json"), reason="fixture not recorded")
async def test_llama_cpp_python_recorded_shape() -> None:
    upstream = client("llama_cpp_python", [])
    completion = await upstream.complete(CALL)
    recorded = json.loads((FIXTURES / "llama_cpp_python_completion.json").read_text())
    assert completion.text == recorded["choices"][0]["text"]
    assert len(completion.tokens) == len(recorded["choices"][0]["logprobs"]["tokens"])
    assert all(token.top_logprob <= 0 for token in completion.tokens)
    # Its greedy pick here is not its top-1 ("-" at -2.30 beside "\n" at -0.81): top-1 is the max.
    assert completion.tokens[3].top_logprob == pytest.approx(-0.8057594895362854)
    async with upstream.stream(CALL) as stream:
        streamed = "".join([token.text async for token in stream])
    assert streamed == completion.text
    await upstream.aclose()


async def test_missing_logprobs_is_a_clear_error() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "hi", "logprobs": None,
                                                      "finish_reason": "length"}]})

    upstream = UpstreamClient("http://u/v1", "m", role="nudging", transport=httpx.MockTransport(handle))
    with pytest.raises(UpstreamError, match="no logprobs"):
        await upstream.complete(CALL)
    await upstream.aclose()


LLAMA_SERVER_MISSHAPEN: list[Any] = [
    ["content"],
    {"content": 5},
    {"content": "a", "completion_probabilities": "none"},
    {"content": "a", "completion_probabilities": [None]},
    {"content": "a", "completion_probabilities": [{"token": "a", "logprob": "x"}]},
    {"content": "a", "completion_probabilities": [{"token": "a", "logprob": -1, "bytes": [300]}]},
    {"content": "a", "completion_probabilities": [{"token": "a", "logprob": -1, "top_logprobs": [5]}]},
    {"content": "a", "stop": True, "tokens_evaluated": "6"},
    {"content": "a", "stop": True, "stop_type": 3},
]


def _answering(kind: str, answer: Any) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return models_answer(kind)
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, text=f"data: {json.dumps(answer)}\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("answer", LLAMA_SERVER_MISSHAPEN)
async def test_a_misshapen_llama_server_answer_is_an_upstream_error(answer: Any, stream: bool) -> None:
    upstream = UpstreamClient("http://upstream:8000/v1", "m", role="base",
                              transport=_answering("llama_server", answer))
    with pytest.raises(UpstreamError, match="malformed"):
        if stream:
            async with upstream.stream(CALL) as tokens:
                [token async for token in tokens]
        else:
            await upstream.complete(CALL)
    await upstream.aclose()
