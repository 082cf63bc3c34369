"""The local llama.cpp upstream on the real bundled GGUF models (the ``demo`` extra).

Greedy output is checked against an independent computation: llama-cpp-python's own ``Llama``
evaluating from an empty cache and reading its logits. A prompt the server evaluates afresh
(also right after a different prompt) must give the same text and logprobs to 1e-3. A prompt
served from the KV cache is compared with the same computation done in the same order (the
cached prefix, the generated tokens one by one, then the new suffix): llama.cpp's CPU kernels
round differently for a batch of tokens than for single tokens, which moves these small
quantised models' logprobs by up to ~0.1 (``Llama`` itself shows it: one prompt evaluated as
a batch or token by token), so a cache-reusing server cannot match a fresh batch exactly.

The whole module is skipped when llama-cpp-python or the model packages are not installed;
it fails when the installed llama.cpp cannot serve them on this CPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (pip install '.[demo]')",
                allow_module_level=True)

# The engine first: it sets the OpenMP spin default that must precede loading llama_cpp.
try:
    from upstreams.local.engine import LlamaCppModel
except (ImportError, OSError, RuntimeError) as broken:  # e.g. its shared library fails to load
    pytest.skip(f"llama-cpp-python cannot be loaded: {broken}", allow_module_level=True)

import llama_cpp

from upstreams.local import weights
from upstreams.local.app import create_app
from upstreams.local.cli import add_arguments
from upstreams.local.generation import GenerationResult, Prefill, generate
from upstreams.local.text import StopStrings, Utf8Pieces
from upstreams.openai_api import Sampling

from .servers import running

pytestmark = pytest.mark.real_model

try:
    SMOLLM_PATH = weights.smollm_path()
    GEMMA_PATH = weights.gemma_path()
except weights.MissingModelError as missing:
    pytest.skip(str(missing), allow_module_level=True)


def _llama_cpp_failure() -> str | None:
    """Why this llama.cpp build cannot serve the bundled models here, or None when it can.

    The local upstream's own start-up check (a multi-token prompt, then single tokens, in a
    child process, since a build for the wrong CPU kills the process that runs it).
    """
    from upstreams.local.generation import EngineError
    from upstreams.local.selftest import check_model

    try:
        for path in (SMOLLM_PATH, GEMMA_PATH):
            check_model(path, n_ctx=CTX, n_threads=THREADS)
    except EngineError as error:
        return str(error)
    return None


THREADS = 1  # robust when other processes compete for the cores (see default_threads)
CTX = 2048
# A build that crashes here is what `make` gave a user of this machine: a failure, not a skip.
_failure = _llama_cpp_failure()
if _failure is not None:
    pytest.fail(_failure, pytrace=False)

SMOLLM_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TIMEOUT = httpx.Timeout(60.0)


# ---------------------------------------------------------------------------------------------
# An independent reference: llama-cpp-python's Llama from an empty cache, with its own logits


class Reference:
    def __init__(self, path: Path) -> None:
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_threads=THREADS,
                                   n_threads_batch=THREADS, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def tokenize(self, prompt: str) -> list[int]:
        tokens: list[int] = self.llm.tokenize(prompt.encode(), add_bos=True, special=True)
        return tokens

    def greedy(self, prompt: str | list[list[int]], max_tokens: int,
               ) -> tuple[list[int], list[float]]:
        """Greedy ids and their logprobs, from an empty cache.

        `prompt` is text (evaluated as one batch, as any fresh server would), or the token
        chunks to evaluate one after the other, to replay how a cache-reusing server built
        its cache: llama.cpp's CPU kernels round differently for a batch of tokens than for
        single tokens, so only the same schedule gives the same numbers.
        """
        llm = self.llm
        llm.reset()  # type: ignore[no-untyped-call, unused-ignore]  # (untyped when installed)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        for chunk in [self.tokenize(prompt)] if isinstance(prompt, str) else prompt:
            llm.eval(chunk)
        ids: list[int] = []
        logprobs: list[float] = []
        for _ in range(max_tokens):
            pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)
            token = int(np.argmax(logits))
            peak = logits.max()
            ids.append(token)
            logprobs.append(float(logits[token] - peak - np.log(np.exp(logits - peak).sum())))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            llm.eval([token])
        return ids, logprobs

    def text(self, ids: list[int]) -> str:
        """The generated text: token pieces joined as bytes, end tokens left out."""
        pieces = b""
        buffer = ctypes.create_string_buffer(256)
        for token in ids:
            if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
                size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 256, 0, False)
                pieces += buffer.raw[:size]
        return pieces.decode("utf-8", errors="ignore")


@dataclass
class Served:
    url: str
    model: LlamaCppModel
    reference: Reference
    name: str


@pytest.fixture(scope="module")
def smollm() -> Iterator[Served]:
    with (LlamaCppModel(SMOLLM_PATH, n_ctx=CTX, n_threads=THREADS) as model,
          running(create_app(model, "smollm")) as url):
        yield Served(url, model, Reference(SMOLLM_PATH), "smollm")


@pytest.fixture(scope="module")
def gemma() -> Iterator[Served]:
    with (LlamaCppModel(GEMMA_PATH, n_ctx=CTX, n_threads=THREADS) as model,
          running(create_app(model, "gemma")) as url):
        yield Served(url, model, Reference(GEMMA_PATH), "gemma")


@pytest.fixture(params=["smollm", "gemma"])
def served(request: pytest.FixtureRequest) -> Served:
    fixture: Served = request.getfixturevalue(request.param)
    return fixture


def complete(served: Served, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"model": served.name, "prompt": prompt, "temperature": 0.0, **fields}
    response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def stream(served: Served, prompt: str, **fields: Any) -> list[dict[str, Any]]:
    body = {"model": served.name, "prompt": prompt, "temperature": 0.0, "stream": True, **fields}
    chunks = []
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body,
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                chunks.append({"done": True})
            else:
                chunks.append(json.loads(line[len("data: "):]))
    assert chunks[-1] == {"done": True}
    return chunks[:-1]


def stats(served: Served) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(f"{served.url}/stats").json()
    return counts


def count_tokens(served: Served, prompt: str) -> int:
    return int(httpx.post(f"{served.url}/tokenize", json={"prompt": prompt}).json()["count"])


def forget(served: Served) -> None:
    """Leave the server's cache holding a prompt that shares nothing with the test prompts
    (but a BOS token, whose cached keys/values are those of a fresh batch anyway)."""
    complete(served, "Zebras", max_tokens=1)


def assert_matches_reference(served: Served, prompt: str, max_tokens: int = 24,
                             replay: list[list[int]] | None = None) -> dict[str, Any]:
    body = complete(served, prompt, max_tokens=max_tokens, logprobs=1)
    ids, expected = served.reference.greedy(replay or prompt, max_tokens)
    choice = body["choices"][0]
    assert choice["text"] == served.reference.text(ids)
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(expected) == body["usage"]["completion_tokens"]
    assert np.allclose(got, expected, atol=1e-3), (got, expected)
    return body


def counters(served: Served, request: Callable[[], Any]) -> dict[str, int]:
    """How the /stats counters moved during `request()`."""
    before = stats(served)
    request()
    after = stats(served)
    return {key: after[key] - before[key] for key in after}


# ---------------------------------------------------------------------------------------------
# Greedy output and the KV cache

PROMPTS = {
    # No common prefix within a model (but Gemma's BOS).
    "smollm": [SMOLLM_CHAT.format("Name three colors of the rainbow."),
               "The capital of France is"],
    "gemma": ["The capital of France is", "Once upon a time, in a small village,"],
}


def test_greedy_text_and_logprobs_match_a_fresh_llama(served: Served) -> None:
    forget(served)
    body = assert_matches_reference(served, PROMPTS[served.name][0])
    logprobs = body["choices"][0]["logprobs"]
    # Greedy: the chosen token is the top-1 entry; tokens join to the text, offsets index it.
    for value, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert max(top.values()) == pytest.approx(value)
    text = body["choices"][0]["text"]
    assert "".join(logprobs["tokens"]) == text
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"], strict=True):
        assert text[offset:offset + len(token)] == token


def test_cache_is_invalidated_and_reused(served: Served) -> None:
    first, second = PROMPTS[served.name]
    forget(served)
    assert_matches_reference(served, first)
    # A different prompt right after: nothing of the first one may leak into it.
    moved = counters(served, lambda: assert_matches_reference(served, second, max_tokens=16))
    assert moved["prompt_tokens_reused"] <= 1  # at most Gemma's BOS
    body = complete(served, second, max_tokens=16)  # the same prompt: served from the cache
    # A prompt extending the previous one (prompt + its answer + more, as nudging sends).
    extended = second + body["choices"][0]["text"] + " And"
    tokens = served.reference.tokenize(extended)
    second_tokens = served.reference.tokenize(second)
    ids, _ = served.reference.greedy(second, 16)
    cached = second_tokens + ids[:-1]  # the last generated token was never evaluated
    kept = 0
    while kept < min(len(cached), len(tokens) - 1) and cached[kept] == tokens[kept]:
        kept += 1
    # Replayed with the server's schedule, the numbers are the same to rounding error: the
    # reused keys/values are exactly the ones a fresh evaluation in that order computes.
    replay = [second_tokens, *([t] for t in cached[len(second_tokens):kept]), tokens[kept:]]
    moved = counters(served, lambda: assert_matches_reference(
        served, extended, max_tokens=12, replay=[c for c in replay if c]))
    # Only the new suffix was evaluated; the prompt and the generated tokens were reused.
    assert moved["prompt_tokens_reused"] == kept >= len(second_tokens)
    assert moved["prompt_tokens_evaluated"] == len(tokens) - kept <= 6
    assert moved["tokens_generated"] == 12


def test_repeated_prompt_costs_no_evaluation(smollm: Served) -> None:
    prompt = PROMPTS["smollm"][1]
    first = complete(smollm, prompt, max_tokens=6, logprobs=3)
    moved = counters(smollm, lambda: complete(smollm, prompt, max_tokens=6, logprobs=3))
    assert moved["prompt_tokens_evaluated"] == 0
    assert moved["prompt_tokens_reused"] == count_tokens(smollm, prompt)
    again = complete(smollm, prompt, max_tokens=6, logprobs=3)
    assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]


# ---------------------------------------------------------------------------------------------
# Streaming, stop strings, finish reasons


def test_streaming_equals_non_streaming(served: Served) -> None:
    prompt = PROMPTS[served.name][1]
    body = complete(served, prompt, max_tokens=20, logprobs=2)
    chunks = stream(served, prompt, max_tokens=20, logprobs=2,
                    stream_options={"include_usage": True})
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]
    token_chunks = chunks[:-1]
    choice = body["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == choice["text"]
    assert len({c["id"] for c in chunks}) == 1
    streamed_logprobs = [c["choices"][0]["logprobs"] for c in token_chunks]
    assert [lp["tokens"][0] for lp in streamed_logprobs] == choice["logprobs"]["tokens"]
    assert [lp["text_offset"][0] for lp in streamed_logprobs] == choice["logprobs"]["text_offset"]
    assert np.allclose([lp["token_logprobs"][0] for lp in streamed_logprobs],
                       choice["logprobs"]["token_logprobs"], atol=1e-5)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])


def test_stop_strings_cut_the_text_and_are_never_streamed(smollm: Served) -> None:
    prompt = PROMPTS["smollm"][0]
    full = complete(smollm, prompt, max_tokens=40)["choices"][0]["text"]
    words = full.split(" ")
    stop = " " + words[3][:3]  # a stop string starting inside the text, spanning tokens
    expected = full[:full.index(stop)]
    body = complete(smollm, prompt, max_tokens=40, stop=["never-there", stop], logprobs=1)
    choice = body["choices"][0]
    assert choice["text"] == expected
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert "".join(choice["logprobs"]["tokens"]) == expected
    chunks = stream(smollm, prompt, max_tokens=40, stop=[stop])
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == expected
    assert chunks[-1]["choices"][0]["stop_reason"] == stop


def test_finish_reasons_and_end_token(smollm: Served) -> None:
    body = complete(smollm, SMOLLM_CHAT.format("What is the capital of France?"), max_tokens=64,
                    logprobs=1)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    # The end-of-turn token is the last token, with no text, and counted.
    assert choice["logprobs"]["tokens"][-1] == ""
    assert "<|im_end|>" in choice["logprobs"]["top_logprobs"][-1]
    assert "<|im_end|>" not in choice["text"]
    assert body["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])
    short = complete(smollm, SMOLLM_CHAT.format("What is the capital of France?"), max_tokens=3)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_end_tokens_of_both_chat_formats_end_generation(smollm: Served, gemma: Served) -> None:
    for served, end in ((smollm, "<|im_end|>"), (gemma, "<end_of_turn>"), (gemma, "<eos>")):
        tokens = served.model.tokenize(end, add_special=False)
        assert len(tokens) == 1 and served.model.is_end(tokens[0]), (served.name, end)
    assert not gemma.model.is_end(gemma.model.tokenize("Paris", add_special=False)[0])


def test_echo_without_logprobs(smollm: Served) -> None:
    prompt = PROMPTS["smollm"][1]
    plain = complete(smollm, prompt, max_tokens=5)["choices"][0]["text"]
    echoed = complete(smollm, prompt, max_tokens=5, echo=True)["choices"][0]["text"]
    assert echoed == prompt + plain
    chunks = stream(smollm, prompt, max_tokens=5, echo=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt + plain


def test_sampling_repeats_with_a_seed_and_reports_raw_logprobs(smollm: Served) -> None:
    prompt = PROMPTS["smollm"][0]
    runs = [complete(smollm, prompt, max_tokens=16, temperature=1.3, top_p=0.9, seed=11,
                     logprobs=5) for _ in range(2)]
    assert runs[0]["choices"][0]["text"] == runs[1]["choices"][0]["text"]
    greedy = complete(smollm, prompt, max_tokens=1, logprobs=5)
    # Position 0 has the same distribution whatever the temperature: logprobs are raw.
    sampled_top = runs[0]["choices"][0]["logprobs"]["top_logprobs"][0]
    greedy_top = greedy["choices"][0]["logprobs"]["top_logprobs"][0]
    for token, value in greedy_top.items():
        assert sampled_top[token] == pytest.approx(value, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# UTF-8


class ByteModel:
    """A fake model that emits a fixed token sequence, each token a few bytes."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces + [b""]  # the last id is the end token
        self.position = 0

    def prefill(self, prompt: Any) -> Prefill:
        self.position = 0
        return Prefill(0, len(prompt))

    def advance(self, token: int) -> None:
        self.position += 1

    def logits(self) -> Any:
        logits = np.zeros(len(self.pieces), dtype=np.float32)
        logits[self.position] = 10.0
        return logits

    def is_end(self, token: int) -> bool:
        return token == len(self.pieces) - 1

    def piece(self, token: int) -> bytes:
        return self.pieces[token]

    def label(self, token: int) -> str:
        return repr(self.pieces[token])


def test_characters_split_across_tokens_are_never_halved() -> None:
    text = "café → 日本 🙂!"
    data = text.encode()
    pieces = [data[i:i + 2] for i in range(0, len(data), 2)]  # cuts most characters
    model = ByteModel(pieces)
    outcome = GenerationResult()
    steps = list(generate(model, [1], Sampling(max_tokens=100, temperature=0.0, logprobs=1),
                          outcome))
    assert outcome.text == text and outcome.finish_reason == "stop"
    assert "".join(s.piece for s in steps) == text
    assert "".join(s.delta for s in steps) == text
    assert all("\ufffd" not in s.piece for s in steps)
    assert any(s.piece == "" for s in steps[:-1])  # a token ending mid-character gives ""
    for step in steps:
        assert text[step.offset:step.offset + len(step.piece)] == step.piece


def test_incremental_decoder_drops_an_unfinished_character() -> None:
    decoder = Utf8Pieces()
    assert decoder.feed("é".encode()[:1]) == "" and decoder.pending
    assert decoder.feed("é".encode()[1:]) == "é" and not decoder.pending


def test_stop_string_hold_back() -> None:
    stops = StopStrings(["</s>", "END"])
    assert stops.releasable("hello </", 0) == len("hello ")
    assert stops.releasable("hello E", 0) == len("hello ")
    assert stops.releasable("hello x", 0) == len("hello x")
    hit = stops.find("ab END c</s>", 8)
    assert hit is not None and hit.stop == "END"  # the earliest occurrence wins


def test_real_model_writes_non_ascii_cleanly(smollm: Served) -> None:
    prompt = SMOLLM_CHAT.format("Write the word 'hello' in Chinese, Japanese and Russian.")
    body = complete(smollm, prompt, max_tokens=48, logprobs=1)
    choice = body["choices"][0]
    text = choice["text"]
    assert any(ord(c) > 127 for c in text), text
    assert "\ufffd" not in text
    tokens = choice["logprobs"]["tokens"]
    assert "".join(tokens) == text
    for token, offset in zip(tokens, choice["logprobs"]["text_offset"], strict=True):
        assert text[offset:offset + len(token)] == token
    chunks = stream(smollm, prompt, max_tokens=48)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


# ---------------------------------------------------------------------------------------------
# Concurrency and cancellation


async def test_concurrent_requests_equal_sequential_ones(smollm: Served) -> None:
    prompts = [SMOLLM_CHAT.format(q) for q in
               ("What is 2+2?", "Name a fruit.", "What color is the sky?", "Say a greeting.")]
    sequential = [complete(smollm, p, max_tokens=16, logprobs=1)["choices"][0] for p in prompts]

    async with httpx.AsyncClient(base_url=smollm.url, timeout=TIMEOUT) as client:
        async def one(prompt: str, streamed: bool) -> tuple[str, list[float]]:
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 1}
            if not streamed:
                choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
                return choice["text"], choice["logprobs"]["token_logprobs"]
            text, values = "", []
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        values += choice["logprobs"]["token_logprobs"]
            return text, values

        results = await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts)))
    for (text, values), expected in zip(results, sequential, strict=True):
        assert text == expected["text"]
        assert np.allclose(values, expected["logprobs"]["token_logprobs"], atol=1e-3)


def wait_idle(served: Served, seconds: float = 3.0) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    while True:
        current = stats(served)
        if current["open_requests"] == 0 or time.monotonic() > deadline:
            return current
        time.sleep(0.02)


async def test_disconnected_clients_stop_generation(smollm: Served) -> None:
    wait_idle(smollm)
    before = stats(smollm)
    long_prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # SmolLM2 counts on for 600+ tokens
    queued_prompt = "A prompt that waits in the queue and is never computed: " + "x " * 200
    release = asyncio.Event()
    async with httpx.AsyncClient(base_url=smollm.url, timeout=TIMEOUT) as client:
        async def streamed() -> int:
            received = 0
            body = {"prompt": long_prompt, "max_tokens": 1500, "temperature": 0, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        received += 1
                        if release.is_set():
                            break  # leaving the block closes the connection
            return received

        long_task = asyncio.create_task(streamed())
        await asyncio.sleep(0.3)  # the long stream is generating
        queued = asyncio.create_task(client.post(
            "/v1/completions", json={"prompt": queued_prompt, "max_tokens": 5}))
        deadline = time.monotonic() + 10
        while stats(smollm)["requests_total"] - before["requests_total"] < 2:  # it is queued
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        queued.cancel()  # the client leaves while its request waits behind the stream
        with pytest.raises(asyncio.CancelledError):
            await queued
        await asyncio.sleep(0.1)
        at_release = stats(smollm)
        # Still open: the stream, and the cancelled request until the worker drops it.
        assert at_release["open_requests"] == 2
        release.set()
        assert await long_task > 0
    after = await asyncio.to_thread(wait_idle, smollm)
    assert after["open_requests"] == 0
    assert after["requests_cancelled"] - before["requests_cancelled"] == 2
    # Generation stopped within a few tokens of the client leaving, far from max_tokens.
    assert after["tokens_generated"] - at_release["tokens_generated"] < 50
    # The queued request's prompt was never evaluated: only the long prompt's tokens were.
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    assert evaluated <= count_tokens(smollm, long_prompt)


# ---------------------------------------------------------------------------------------------
# Tokenizer endpoints, chat templates, models, errors


def test_tokenize_and_detokenize_render_the_chat_template(smollm: Served) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    reply = httpx.post(f"{smollm.url}/tokenize",
                       json={"model": "smollm", "messages": messages,
                             "add_generation_prompt": True}).json()
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == CTX
    text = httpx.post(f"{smollm.url}/detokenize",
                      json={"model": "smollm", "tokens": reply["tokens"]}).json()["prompt"]
    # SmolLM2's template (from its GGUF) adds its default system prompt.
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # Sent back as a prompt, the rendered text is the same tokens (special tokens parsed).
    again = httpx.post(f"{smollm.url}/tokenize", json={"prompt": text}).json()["tokens"]
    assert again == reply["tokens"]
    without = httpx.post(f"{smollm.url}/tokenize",
                         json={"messages": messages, "add_generation_prompt": False}).json()
    assert without["count"] < reply["count"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "text", "text": "there"}]}]
    joined = httpx.post(f"{smollm.url}/tokenize", json={"messages": parts}).json()["tokens"]
    assert "Hi\nthere" in httpx.post(f"{smollm.url}/detokenize",
                                     json={"tokens": joined}).json()["prompt"]


def test_gemma_prompts_keep_one_bos_and_its_gguf_has_no_chat_template(gemma: Served) -> None:
    bos = gemma.model.bos_id
    plain = httpx.post(f"{gemma.url}/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    written = httpx.post(f"{gemma.url}/tokenize", json={"prompt": "<bos>Hello"}).json()["tokens"]
    assert plain == written and plain[0] == bos and plain.count(bos) == 1
    # The bundled Gemma 3 270M is a base model: its GGUF carries no chat template.
    response = httpx.post(f"{gemma.url}/tokenize",
                          json={"messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]


def test_models_health_and_errors(smollm: Served) -> None:
    url = smollm.url
    assert httpx.get(f"{url}/health").status_code == 200
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == "smollm" and card["max_model_len"] == CTX

    def error(body: dict[str, Any], status: int = 400) -> str:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == status, response.text
        payload = response.json()["error"]
        assert payload["code"] == status
        return str(payload["message"])

    too_long = error({"prompt": "word " * (CTX + 10), "max_tokens": 1})
    assert "maximum context length" in too_long
    assert "cannot be greater than max_model_len" in error({"prompt": "hi", "max_tokens": CTX + 1})
    assert "does not exist" in error({"model": "other", "prompt": "hi"}, 404)
    assert "echo" in error({"prompt": "hi", "echo": True, "logprobs": 1})
    assert "n=1" in error({"prompt": "hi", "n": 2})
    assert "max allowed" in error({"prompt": "hi", "logprobs": 50})
    error({"prompt": "hi", "max_tokens": -1})
    error({"prompt": 5})
    ignored = complete(smollm, "hi", max_tokens=2, frobnicate=True)  # unknown fields ignored
    assert ignored["usage"]["completion_tokens"] == 2
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400


def test_cli_hooks() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--gguf", "smollm", "--port", "9001", "--threads", "1",
                              "--ctx", "1024", "--name", "nudger"])
    assert (args.port, args.threads, args.ctx, args.name) == (9001, 1, 1024, "nudger")
    with pytest.raises(SystemExit):
        parser.parse_args(["--gguf", "x", "--threads", "0"])
