"""`nudging-proxy demo` on the real bundled models, through the official `openai` SDK.

The module starts the real command (``python -m cli demo``) on free ports with one
llama.cpp thread per model: Gemma 3 270M base nudged by SmolLM2-135M-Instruct. It checks
nudged, base-only and nudger-only answers with the sync and async SDK, streaming and not;
compares the `fast` and `paper` strategies on ten prompts, finding the cause of every
divergence; and checks that SIGTERM stops the proxy and both model processes.

Upstream state: the local upstream reuses its KV cache across requests, and llama.cpp's CPU
kernels round a batch of tokens differently from the same tokens in other batches (see
tests/test_local_upstream.py), so a greedy answer depends on what the upstream evaluated
before. Every generation compared here therefore starts from the same state: each upstream
first evaluates an unrelated prompt, so that the generation's first request is evaluated
afresh (`reset_caches`). Without that, even the same request twice can get different text.

Run with ``pytest -s`` to see the fast-vs-paper table. The module is skipped when
llama-cpp-python or the model packages are missing; it fails when llama.cpp cannot run on this CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (pip install '.[demo]')",
                allow_module_level=True)

from upstreams.local import weights

try:
    weights.gemma_path()
    weights.smollm_path()
except weights.MissingModelError as missing:
    pytest.skip(str(missing), allow_module_level=True)

import openai
from openai.types.chat import ChatCompletionMessageParam

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.templates import Message, base_prompt
from nudging_core.types import GenerationStats, Role
from nudging_core.upstream import UpstreamClient
from server.routes import READY_CACHE_SECONDS

# Importing it runs the local upstream's start-up check on both models, and fails this module
# as well when the installed llama.cpp build cannot serve them on this CPU.
from . import test_local_upstream as _llama_cpp_checked  # noqa: F401
from .servers import free_port

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 240
MAX_TOKENS = 48  # fast vs paper
SDK_TOKENS = 32  # the SDK checks
THRESHOLD = 0.3  # configs/demo.yaml's threshold for gemma-nudged
# llama.cpp's batch-dependent rounding moves these models' logprobs by up to ~0.1 (measured
# in tests/test_local_upstream.py; the nudger's first token can move more, ~0.25): a
# decision closer than this to its threshold, or a top-1 closer than this to the top-2,
# can go either way.
NUMERIC_MARGIN = 0.1

QUESTION = "Why is the sky blue?"
QUESTIONS = [
    "Why is the sky blue?",
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "How do airplanes fly?",
    "What is photosynthesis?",
    "Write a short poem about the sea.",
    "Explain what a computer is to a child.",
    "What are the benefits of reading books?",
    "How do I make a cup of tea?",
    "Why do cats purr?",
]
# Observed on this machine (2 cores, one thread per model), these 10 prompts, max_tokens 48,
# each generation from reset caches, five runs: 8 of 10 equal once, 9 of 10 four times.
# The divergences: airplanes in every run, `paper`'s chunk_copies_output guard at char 131
# (before `fast` judged the chunk guards too, it went on with the base: "Airplanes are designed
# to fly using the principle of aerodynamics." again); the poem in one run, a takeover probe
# whose top-1 probability is
# 0.308 for a threshold of 0.3 (0.2999 with another batch split of the same tokens; which
# split the base sees depends on what its KV cache holds, and in `fast` on the timing of the
# concurrent probes). Re-tokenization never caused one: `paper` fetched no second chunk
# within 48 tokens on these prompts; at 128 tokens its chunk prompts (4 in 3 prompts)
# re-tokenized to the generated tokens, and so did every prefix of Gemma's greedy
# 128-token answers to these prompts (1280 prefixes).
# The bound is the observed worst case minus two more near-threshold flips; the assertion
# that matters more is that every divergence has a cause.
MIN_EQUAL = 6


# ---------------------------------------------------------------------------------------------
# The demo stack as a child process


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    proxy: str
    base: str
    nudger: str
    ports: tuple[int, int, int]  # proxy, base, nudger
    log: Path
    config: dict[str, Any]
    children: list[int] = field(default_factory=list)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> int | None:
        """SIGTERM to the demo command; its exit code (None if it had to be killed)."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            for pid in self.children:  # never leave model processes behind
                _kill(pid)
            return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _demo_config(base_port: int, nudger_port: int) -> dict[str, Any]:
    """configs/demo.yaml with its two upstreams moved to the given ports."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    ports = {"gemma": base_port, "smollm": nudger_port}
    for model in config["models"]:
        for role in ("base", "nudging"):
            if role in model:
                upstream = model[role]
                upstream["url"] = f"http://127.0.0.1:{ports[upstream['model']]}/v1"
    return config


def _start_demo(directory: Path) -> Demo:
    proxy_port, base_port, nudger_port = free_port(), free_port(), free_port()
    assert len({proxy_port, base_port, nudger_port}) == 3
    config = _demo_config(base_port, nudger_port)
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "demo.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "demo", "--config", str(path),
             "--port", str(proxy_port), "--threads", "1"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
        )
    demo = Demo(process, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{base_port}",
                f"http://127.0.0.1:{nudger_port}", (proxy_port, base_port, nudger_port), log,
                config)
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        for endpoint in ("/health", "/ready"):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the demo exited with code {process.returncode}:\n"
                                       f"{demo.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the demo's {endpoint} did not answer 200 in "
                                       f"{STARTUP_SECONDS} s:\n{demo.log_tail()}")
                try:
                    if httpx.get(demo.proxy + endpoint, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
    except BaseException:
        demo.children = _children(process.pid)
        demo.stop()
        raise
    demo.children = _children(process.pid)
    return demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    started = _start_demo(tmp_path_factory.mktemp("demo"))
    try:
        yield started
    finally:
        started.stop()


def reset_cache(url: str, model: str) -> None:
    """Make the upstream's next prompt be evaluated afresh: an unrelated prompt shares fewer
    tokens with it than the upstream's minimum reuse, so its cache starts over."""
    response = httpx.post(url + "/v1/completions", timeout=60,
                          json={"model": model, "prompt": "Hello world", "max_tokens": 1})
    response.raise_for_status()


def reset_caches(demo: Demo) -> None:
    reset_cache(demo.base, "gemma")
    reset_cache(demo.nudger, "smollm")


def sdk(demo: Demo) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo.proxy + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def async_sdk(demo: Demo) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo.proxy + "/v1", api_key="unused", max_retries=0,
                              timeout=300)


def messages(question: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": question}]


PROVENANCE = {"nudging": {"return_provenance": True}}


def check_report(report: dict[str, Any], text: str, completion_tokens: int) -> None:
    assert "".join(span["text"] for span in report["spans"]) == text
    assert {span["source"] for span in report["spans"]} == {"base", "nudging"}, report["spans"]
    assert report["tokens"]["base"] + report["tokens"]["nudging"] == completion_tokens
    assert 0 < report["nudging_word_ratio"] < 1


# ---------------------------------------------------------------------------------------------
# The SDK against the demo


async def test_nudged_answer_streamed_and_not_with_sync_and_async_sdk(demo: Demo) -> None:
    reset_caches(demo)
    whole = sdk(demo).chat.completions.create(
        model="gemma-nudged", messages=messages(QUESTION), max_tokens=SDK_TOKENS,
        temperature=0, extra_body=PROVENANCE)
    text = whole.choices[0].message.content
    assert text and text.strip()
    assert whole.usage is not None
    assert whole.usage.prompt_tokens > 0
    assert 0 < whole.usage.completion_tokens <= SDK_TOKENS
    assert whole.choices[0].finish_reason in ("stop", "length")
    report = (whole.choices[0].model_extra or {})["nudging"]
    check_report(report, text, whole.usage.completion_tokens)

    reset_caches(demo)
    client = async_sdk(demo)
    stream = await client.chat.completions.create(
        model="gemma-nudged", messages=messages(QUESTION), max_tokens=SDK_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=PROVENANCE)
    chunks = [chunk async for chunk in stream]
    await client.close()
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].finish_reason == whole.choices[0].finish_reason
    streamed_report = (finals[0].model_extra or {})["nudging"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    check_report(streamed_report, streamed, usage.completion_tokens)
    print(f"\nnudged ({report['nudging_word_ratio']:.0%} nudging words, {report['rounds']} rounds): "
          f"{text!r}")


def test_passthrough_models_answer_with_sync_sdk(demo: Demo) -> None:
    client = sdk(demo)
    for model in ("gemma-base", "smollm-instruct"):
        whole = client.chat.completions.create(model=model, messages=messages(QUESTION),
                                               max_tokens=SDK_TOKENS, temperature=0)
        text = whole.choices[0].message.content
        assert text and text.strip(), model
        assert whole.usage is not None and whole.usage.prompt_tokens > 0
        assert 0 < whole.usage.completion_tokens <= SDK_TOKENS
        stream = client.chat.completions.create(
            model=model, messages=messages(QUESTION), max_tokens=SDK_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        # A passthrough request repeats on a cache that holds its prompt: the upstream
        # answers from its memo of that prompt's logits, so the greedy text is the same.
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_passthrough_models_answer_with_async_sdk(demo: Demo) -> None:
    client = async_sdk(demo)

    async def ask(model: str) -> tuple[str, int]:
        reply = await client.chat.completions.create(
            model=model, messages=messages("Name three colors."), max_tokens=16,
            temperature=0)
        assert reply.usage is not None
        return reply.choices[0].message.content or "", reply.usage.completion_tokens

    # Different upstreams, so both run at once.
    answers = await asyncio.gather(ask("gemma-base"), ask("smollm-instruct"))
    await client.close()
    for text, tokens in answers:
        assert text.strip() and 0 < tokens <= 16


# ---------------------------------------------------------------------------------------------
# fast vs paper


@dataclass
class Run:
    text: str
    spans: list[dict[str, str]]
    stop_reason: str
    seconds: float
    tokens: int

    def sources(self) -> list[str]:
        """The source of every character."""
        return [span["source"] for span in self.spans for _ in span["text"]]


def nudged(demo: Demo, question: str, strategy: str) -> Run:
    reset_caches(demo)
    started = time.monotonic()
    reply = sdk(demo).chat.completions.create(
        model="gemma-nudged", messages=messages(question), max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"nudging": {"strategy": strategy, "return_provenance": True}})
    seconds = time.monotonic() - started
    report = (reply.choices[0].model_extra or {})["nudging"]
    assert reply.usage is not None and reply.usage.completion_tokens <= MAX_TOKENS
    return Run(reply.choices[0].message.content or "", report["spans"], report["stop_reason"],
               seconds, reply.usage.completion_tokens)


@dataclass(slots=True)
class RecordingStats(GenerationStats):
    """Stats that know how much text has been written so far."""

    position: int = 0


class RecordingTransport(httpx.AsyncHTTPTransport):
    """Records each completions request with the answer and the text written when it was sent."""

    def __init__(self, stats: RecordingStats) -> None:
        super().__init__()
        self.stats = stats
        self.calls: list[tuple[int, dict[str, Any], dict[str, Any]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        position = self.stats.position
        response = await super().handle_async_request(request)
        if not request.url.path.endswith("/completions"):
            return response
        body = await response.aread()
        self.calls.append((position, json.loads(request.content), json.loads(body)))
        return httpx.Response(response.status_code, headers=response.headers, content=body,
                              request=request)


@dataclass
class Replay:
    text: str
    base_calls: list[tuple[int, dict[str, Any], dict[str, Any]]]
    base_prompt: str
    nudging_prompt: str


async def replay_paper(demo: Demo, question: str, max_tokens: int = MAX_TOKENS) -> Replay:
    """`paper` run in-process by the core against the demo's upstreams, recording every base
    request with the length of the text written when it was sent."""
    reset_caches(demo)
    stats = RecordingStats()
    transport = RecordingTransport(stats)
    clients: dict[Role, UpstreamClient] = {
        "base": UpstreamClient(demo.base + "/v1", "gemma", role="base", transport=transport),
        "nudging": UpstreamClient(demo.nudger + "/v1", "smollm", role="nudging"),
    }
    try:
        rendered = await clients["nudging"].render_chat([{"role": "user", "content": question}])
        assert rendered is not None
        request = GenerationRequest(
            method="nudging", max_tokens=max_tokens,
            base_prompt=base_prompt([Message("user", question)]), nudging_prompt=rendered,
            params=NudgingParams(threshold=THRESHOLD, strategy="paper"))
        generation = Generation(request, clients)
        generation.stats = stats
        text = ""
        async for piece in generation.pieces():
            text += piece.text
            stats.position = len(text)
    finally:
        for client in clients.values():
            await client.aclose()
    return Replay(text, transport.calls, request.base_prompt, rendered)


def _tokenize(url: str, model: str, prompt: str) -> list[int]:
    response = httpx.post(url + "/tokenize", json={"model": model, "prompt": prompt}, timeout=60)
    return list(response.json()["tokens"])


def retokenization_differs(demo: Demo, replay: Replay, position: int) -> str | None:
    """Whether `paper`'s chunk request at `position` gives the base other tokens than the
    ones it generated: the chunk re-sends the text, `fast` keeps streaming its tokens."""
    previous = None
    for sent_at, request, response in replay.base_calls:
        prompt = request["prompt"]
        is_chunk = prompt == replay.base_prompt + replay.text[:sent_at]
        if is_chunk and sent_at == position and previous is not None:
            before, answer = previous
            start = len(before) - len(replay.base_prompt)
            generated, length = 0, 0
            for piece in answer["choices"][0]["logprobs"]["tokens"]:
                if start + length >= position:
                    break
                length += len(piece)
                generated += 1
            expected = len(_tokenize(demo.base, "gemma", before)) + generated
            actual = len(_tokenize(demo.base, "gemma", prompt))
            if actual != expected:
                return (f"the chunk at {position} re-tokenizes to {actual} tokens, "
                        f"the base generated {expected}")
            return None
        previous = (prompt, response)
    return None


def _top_two(url: str, model: str, prompt: str) -> tuple[str, float, float]:
    response = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "logprobs": 5, "temperature": 0})
    top = sorted(response.json()["choices"][0]["logprobs"]["top_logprobs"][0].items(),
                 key=lambda item: -item[1])
    return top[0][0], top[0][1], top[1][1]


def numeric_sensitivity(url: str, model: str, prompt: str, context: str,
                        threshold: float | None) -> tuple[bool, float]:
    """The decision at `prompt + context` under different evaluation schedules of the same
    tokens: evaluated afresh in one batch, and after the cache holds the context without its
    last 1..5 words (the rest evaluated as a second batch), as the upstream does when it
    reuses a cached prefix. Returns whether the decision flips (argmax, or the top-1
    probability crossing `threshold`) and the smallest margin seen, in logprob units."""
    words = context.split(" ")
    prefixes = [None] + [" ".join(words[:-n]) for n in range(1, min(5, len(words) - 1) + 1)]
    seen: list[tuple[str, float, float]] = []
    for prefix in prefixes:
        reset_cache(url, model)
        if prefix is not None:
            httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": prompt + prefix, "max_tokens": 1})
        seen.append(_top_two(url, model, prompt + context))
    tops = [logprob for _, logprob, _ in seen]
    flip = len({token for token, _, _ in seen}) > 1
    margin = min(first - second for _, first, second in seen)
    if threshold is not None:
        limit = math.log(threshold)
        flip = flip or (min(tops) < limit <= max(tops))
        margin = min(margin, min(abs(top - limit) for top in tops))
    return flip, margin


@dataclass
class Divergence:
    question: str
    first_char: int  # first character where the texts differ
    first_source: int  # first character written by different models (<= first_char)
    cause: str | None
    detail: str


def classify(demo: Demo, question: str, fast: Run, paper: Run) -> Divergence:
    """Why `fast` and `paper` wrote different text: (retokenization) the base re-reading
    re-tokenized text at a `paper` chunk, (numeric) llama.cpp's batch-dependent rounding
    flipping a decision that sits at its threshold or at a tie."""
    k = next((i for i, (a, b) in enumerate(zip(fast.text, paper.text, strict=False)) if a != b),
             min(len(fast.text), len(paper.text)))
    sources = next((i for i, (a, b) in enumerate(zip(fast.sources(), paper.sources(), strict=False))
                    if a != b or i >= k), k)
    # A decision is taken where the text so far ends; a word's leading space is the next
    # token's, so the decision point is before it.
    points = sorted({len(paper.text[:at].rstrip(" ")) for at in (sources, k)})
    # The budget only cuts the text, so a replay that stops soon after the divergence makes
    # the same requests up to there; the full budget when that estimate falls short.
    budget = min(MAX_TOKENS, math.ceil(paper.tokens * (k + 1) / max(len(paper.text), 1)) + 8)
    replay = asyncio.run(replay_paper(demo, question, budget))
    if len(replay.text) <= k and budget < MAX_TOKENS:
        replay = asyncio.run(replay_paper(demo, question))
    notes = []
    if replay.text[: k + 1] != paper.text[: k + 1]:
        notes.append("in-process paper replay differs before the divergence")
    else:
        for point in points:
            differs = retokenization_differs(demo, replay, point)
            if differs:
                return Divergence(question, k, sources, "retokenization", differs)
    found = []
    for point in points:  # the base first; the nudger only when the base shows nothing
        context = paper.text[:point]
        for url, model, prompt, threshold in (
                (demo.base, "gemma", replay.base_prompt, THRESHOLD),
                (demo.nudger, "smollm", replay.nudging_prompt, None)):
            flip, margin = numeric_sensitivity(url, model, prompt, context, threshold)
            if flip or margin < NUMERIC_MARGIN:
                found.append(f"{model} at char {point}: "
                             f"{'flips with the batch split' if flip else 'no flip seen'}, "
                             f"margin {margin:.3f}")
                break
        if found:
            break
    if found:
        return Divergence(question, k, sources, "numeric", "; ".join(found + notes))
    return Divergence(question, k, sources, None, "; ".join(notes) or "no cause found")


def test_fast_and_paper_agree_on_real_models_except_for_explained_causes(demo: Demo) -> None:
    rows = []
    divergences = []
    for question in QUESTIONS:
        fast, paper = nudged(demo, question, "fast"), nudged(demo, question, "paper")
        assert fast.text and paper.text
        if fast.text == paper.text:
            rows.append((question, True, "", "", fast, paper))
            continue
        divergence = classify(demo, question, fast, paper)
        divergences.append(divergence)
        k = divergence.first_char
        shown = f"char {k}: {fast.text[k:k + 12]!r} vs {paper.text[k:k + 12]!r}"
        rows.append((question, False, f"({divergence.cause}) {divergence.detail}", shown,
                     fast, paper))
    print("\nfast vs paper, gemma-nudged, greedy, max_tokens", MAX_TOKENS)
    print(f"{'prompt':42} {'equal':5} {'fast s':>6} {'paper s':>7}  cause")
    for question, equal, cause, shown, fast, paper in rows:
        print(f"{question[:42]:42} {'yes' if equal else 'no':5} {fast.seconds:6.1f} "
              f"{paper.seconds:7.1f}  {cause}")
        if shown:
            print(f"{'':42} {shown}")
    equal_count = sum(1 for row in rows if row[1])
    print(f"equal: {equal_count} of {len(rows)}")
    unexplained = [d for d in divergences if d.cause is None]
    assert not unexplained, unexplained
    assert equal_count >= MIN_EQUAL


# ---------------------------------------------------------------------------------------------
# The README's command, and a crashed upstream


def _readme_curl() -> str:
    """The quickstart's curl command, as the README gives it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("In another shell:\n\n```bash\n", 1)[1].split("```", 1)[0]
    assert block.startswith("curl "), block
    return block


def test_the_readmes_curl_command_streams_a_nudged_answer(demo: Demo) -> None:
    command = _readme_curl().replace("http://127.0.0.1:8080", demo.proxy)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]", done.stdout[-2000:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), done.stdout[-2000:]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks
                   if chunk["choices"])
    assert len(text.split()) > 3, text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_crashed_model_process_is_reported_and_restarted(demo: Demo) -> None:
    nudger = next(pid for pid in _children(demo.process.pid)
                  if "smollm" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
    os.kill(nudger, signal.SIGSEGV)
    report = f"the upstream 'smollm' on port {demo.ports[2]} was killed by SIGSEGV (exit status 139)"
    deadline = time.monotonic() + 30
    while report not in demo.log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert report in demo.log.read_text(errors="replace")
    # The restart evaluates a test prompt and loads the model: seconds in which it is down.
    time.sleep(READY_CACHE_SECONDS)  # /ready answers from a check up to that old
    assert httpx.get(demo.proxy + "/ready", timeout=30).status_code == 503
    answer = sdk(demo).with_options(max_retries=0)
    with pytest.raises(openai.APIStatusError) as failed:
        answer.chat.completions.create(model="gemma-nudged", messages=messages(QUESTION),
                                       max_tokens=8)
    assert failed.value.status_code == 502
    assert "its local process 'smollm' was killed by SIGSEGV" in str(failed.value)
    # The supervisor marks the replica up and then logs it: wait for both.
    back = "the upstream 'smollm' is back"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if (httpx.get(demo.proxy + "/ready", timeout=30).status_code == 200
                and back in demo.log.read_text(errors="replace")):
            break
        time.sleep(0.5)
    assert back in demo.log.read_text(errors="replace")
    reply = sdk(demo).chat.completions.create(model="smollm-instruct", messages=messages(QUESTION),
                                              max_tokens=8)
    assert reply.choices[0].message.content
    demo.children = _children(demo.process.pid)  # the restarted process replaces the crashed one


# ---------------------------------------------------------------------------------------------
# Shutdown (last: it stops the module's stack)


def test_sigterm_stops_the_proxy_and_both_model_processes(demo: Demo) -> None:
    assert len(demo.children) == 2, f"expected two local-upstream processes: {demo.children}"
    for pid in demo.children:
        assert "local-upstream" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    code = demo.stop()
    assert code is not None, "the demo did not stop within 60 s of SIGTERM"
    leftovers = [pid for pid in demo.children if _alive(pid)]
    assert not leftovers, f"model processes left running: {leftovers}"
    busy = [port for port in demo.ports if _listening(port)]
    assert not busy, f"still listening after the demo stopped: {busy}"
