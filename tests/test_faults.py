"""Faults: the simulator's fault grammar, and the proxy in front of misbehaving upstreams.

The matrix runs every fault kind against each role of a nudged model, streamed and not,
over real sockets: two simulators, reconfigured through ``POST /faults`` between cases,
and the proxy with short timeouts. Each case must give the documented status (or, once a
stream has started, one error event with the same code and then ``[DONE]``), and the next
request must be served normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator
from upstreams.simulator.faults import COMPLETIONS, MISSHAPEN, Fault, Faults, FaultSpecError, parse_faults

from .servers import running

QUESTION = "Why do leaves change color in autumn?"
TIMEOUTS = {"connect": 2, "read": 1, "first_byte": 1}
# Small caps on an answer's size, so that answers over them stay small too.
CAPS = {"max_answer_bytes": 64 * 1024, "max_event_bytes": 64 * 1024}
# A small pool, so connections the proxy fails to give back soon leave none for the next request.
MAX_IN_FLIGHT = 8


# --- The grammar ---------------------------------------------------------------------------


def test_grammar_defaults_and_fields() -> None:
    assert parse_faults("") == []
    assert parse_faults("stream_cut@0.2, http_503") == [
        Fault("stream_cut", amount=2, rate=0.2),
        Fault("http", status=503),
    ]
    stall, empty, targeted = parse_faults("kind=stream:stall,http_500=empty*1,prompt~sky:delay=3")
    assert (stall.name, stall.events, stall.kinds) == ("stall", 2, frozenset({"stream"}))
    assert (empty.status, empty.empty_body, empty.count) == (500, True, 1)
    assert (targeted.name, targeted.amount, targeted.prompt) == ("delay", 3.0, "sky")
    assert targeted.kinds == COMPLETIONS
    models = parse_faults("kind=models|tokenize:refuse")[0]
    assert models.kinds == frozenset({"models", "tokenize"})
    assert parse_faults("slow=0.5@1*3")[0] == Fault("slow", amount=0.5, rate=1.0, count=3)


@pytest.mark.parametrize(("spec", "message"), [
    ("drop", "unknown fault 'drop'"),
    ("kind=batch:refuse", "unknown request kind 'batch'"),
    ("kind=models:slow", "slow only applies to"),
    ("where=x:refuse", "bad filter"),
    ("http_200", "400-599"),
    ("http_5xx", "not a number"),
    ("refuse=3", "takes no argument"),
    ("http_503=full", "takes no argument but 'empty'"),
    ("delay=-1", ">= 0"),
    ("delay=nan", "not a finite number"),
    ("stall=1.5", "not a number"),
    ("refuse@2", "between 0 and 1"),
    ("refuse*0", "count must be >= 1"),
    ("refuse@x", "not a number"),
])
def test_grammar_errors_name_the_rule(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message) as caught:
        parse_faults("http_503," + spec)
    assert repr(spec) in str(caught.value)


def test_rules_match_kind_prompt_rate_and_count() -> None:
    faults = Faults("prompt~sky:http_500,kind=models:refuse,stall*2,delay@0.5", rng=random.Random(1))
    assert faults.pick("non-stream", "the sky").name == "http"  # type: ignore[union-attr]
    assert faults.pick("models").name == "refuse"  # type: ignore[union-attr]
    assert faults.pick("tokenize", "the sky") is None  # http_500 hits completions only
    assert [faults.pick("stream", "sea").name for _ in range(2)] == ["stall", "stall"]  # type: ignore[union-attr]
    draws = [faults.pick("stream", "sea") for _ in range(200)]  # stall is spent: delay at half the rate
    assert {d.name for d in draws if d is not None} == {"delay"}
    assert 60 < sum(d is not None for d in draws) < 140
    assert faults.injected == 4 + sum(d is not None for d in draws)
    with pytest.raises(FaultSpecError):
        faults.set("bogus")
    assert faults.spec.startswith("prompt~sky")  # a bad spec leaves the old one in force
    faults.set("")
    assert faults.pick("stream", "sky") is None


# --- The proxy under faults ----------------------------------------------------------------


@dataclass
class Stack:
    proxy: str
    upstreams: dict[str, str]  # role -> simulator URL

    def set_faults(self, role: str, spec: str) -> dict[str, Any]:
        response = httpx.post(self.upstreams[role] + "/faults", json={"faults": spec})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def clear(self) -> None:
        for role in self.upstreams:
            self.set_faults(role, "")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as stack:
        base = stack.enter_context(running(create_simulator("base", time_scale=0.02)))
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0.02)))
        roles = {"base": {"url": base + "/v1", "model": "base", "timeouts": TIMEOUTS,
                          "max_in_flight": MAX_IN_FLIGHT, **CAPS},
                 "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml",
                             "timeouts": TIMEOUTS, "max_in_flight": MAX_IN_FLIGHT, **CAPS}}
        config = parse_config({"models": [
            {"name": "nudged", **roles},
            {"name": "no-retry", "retries": 0, **roles},
            {"name": "fallback", "on_nudger_failure": "base_only", **roles},
            {"name": "base-only", "method": "base_only", "base": roles["base"]},
        ]})
        proxy = stack.enter_context(running(create_proxy(config)))
        yield Stack(proxy, {"base": base, "nudging": aligned})


@dataclass
class ProxyAnswer:
    status: int
    code: str | None  # the error's code, from the body or the stream's error event
    message: str
    text: str
    body: dict[str, Any] | None  # the whole answer, or the last chunk of a stream
    raw: str


def ask(stack: Stack, model: str = "nudged", *, stream: bool, max_tokens: int = 12) -> ProxyAnswer:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "stream": stream}
    with httpx.stream("POST", stack.proxy + "/v1/chat/completions", json=body, timeout=30) as response:
        raw = response.read().decode()
    if not stream or response.status_code != 200:
        payload = json.loads(raw)
        error = payload.get("error") or {}
        text = "" if error else payload["choices"][0]["message"]["content"]
        return ProxyAnswer(response.status_code, error.get("code"), error.get("message", ""), text,
                           payload, raw)
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", raw
    chunks = [json.loads(event) for event in events[:-1]]
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    assert len(errors) <= 1 and (not errors or "error" in chunks[-1]), "one error event, last before [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    error = errors[0] if errors else {}
    last = chunks[-1] if chunks else None
    return ProxyAnswer(200, error.get("code"), error.get("message", ""), text, last, raw)


# fault -> the error code the client sees (None: the answer succeeds)
EXPECTED: dict[str, str | None] = {
    "refuse": "upstream_error",  # 502
    "delay=3": "upstream_timeout",  # 504: no headers within first_byte
    "slow=0.05": None,  # slower tokens, but within the timeouts
    "http_500": "upstream_error",
    "http_500=empty": "upstream_error",
    "http_503": "upstream_unavailable",  # 503
    "http_503=empty": "upstream_unavailable",
    "malformed": "upstream_error",
    "stream_cut": "upstream_error",
    "stall": "upstream_timeout",  # 504: no event within read
    "no_logprobs": "upstream_error",
    "context_overflow": "context_length_exceeded",  # 400
    "oversized=32": None,  # a large answer, but under the caps
    "oversized=128": "upstream_error",  # over them: 502, "answer too large"
    # Valid JSON of the wrong shape: a 502 like a body that is not JSON.
    **{f"misshapen={shape}": "upstream_error" for shape in range(len(MISSHAPEN))},
}
STATUS = {"upstream_error": 502, "upstream_unavailable": 503, "upstream_timeout": 504,
          "context_length_exceeded": 400}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("role", ["base", "nudging"])
@pytest.mark.parametrize("fault", list(EXPECTED))
def test_fault_matrix(stack: Stack, fault: str, role: str, stream: bool) -> None:
    stack.clear()
    stack.set_faults(role, fault)
    try:
        outcome = ask(stack, stream=stream)
    finally:
        stack.clear()
    expected = EXPECTED[fault]
    if expected is None:
        assert (outcome.status, outcome.code) == (200, None), outcome.raw
        assert outcome.text
    else:
        # A stream that had started reports the failure as its one error event instead.
        assert outcome.status in (STATUS[expected], 200), outcome.raw
        assert outcome.code == expected, outcome.raw
        assert outcome.status == STATUS[expected] or stream
        named = "prompt is too long" if expected == "context_length_exceeded" else f"The {role} model"
        assert named in outcome.message
        if fault.startswith("oversized"):
            assert "answer too large" in outcome.message, outcome.raw
    for upstream in stack.upstreams.values():
        assert upstream.removeprefix("http://") not in outcome.raw
    assert "127.0.0.1" not in outcome.raw
    after = ask(stack, stream=stream)
    assert (after.status, after.code) == (200, None), after.raw
    assert after.text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("shape", range(len(MISSHAPEN)))
def test_a_misshapen_answer_to_a_passthrough_model_is_a_502(stack: Stack, shape: int, stream: bool) -> None:
    stack.set_faults("base", f"misshapen={shape}")
    try:
        outcome = ask(stack, "base-only", stream=stream)
    finally:
        stack.clear()
    assert outcome.code == "upstream_error", outcome.raw
    assert outcome.status == (200 if stream else 502), outcome.raw


def test_missing_logprobs_say_so(stack: Stack) -> None:
    stack.set_faults("base", "no_logprobs")
    try:
        outcome = ask(stack, stream=False)
    finally:
        stack.clear()
    assert outcome.status == 502
    assert "logprobs" in outcome.message


def test_passthrough_context_overflow_is_a_400(stack: Stack) -> None:
    stack.set_faults("base", "context_overflow")
    try:
        outcome = ask(stack, "base-only", stream=False)
    finally:
        stack.clear()
    assert (outcome.status, outcome.code) == (400, "context_length_exceeded")
    assert "maximum context length" in outcome.message


def test_a_stream_cut_after_text_ends_with_an_error_event(stack: Stack) -> None:
    # The passthrough stream forwards tokens as they come: the cut comes after the first ones.
    stack.set_faults("base", "stream_cut=4")
    try:
        outcome = ask(stack, "base-only", stream=True, max_tokens=30)
    finally:
        stack.clear()
    assert (outcome.status, outcome.code) == (200, "upstream_error")
    assert outcome.text
    assert "The base model" in outcome.message


# The first completion a role's upstream gets, and one whose failure the answer cannot do
# without (a base probe may be one the round never needed).
FIRST_NEEDED = [("nudged", "nudging"), ("base-only", "base")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", ["http_503*1", "refuse*1", "stall=0*1"])
@pytest.mark.parametrize(("model", "role"), FIRST_NEEDED)
def test_a_failure_before_any_text_is_retried(stack: Stack, model: str, role: str, fault: str,
                                              stream: bool) -> None:
    stack.set_faults(role, fault)
    try:
        outcome = ask(stack, model, stream=stream)
        spent = httpx.get(stack.upstreams[role] + "/faults").json()
    finally:
        stack.clear()
    assert (outcome.status, outcome.code) == (200, None), outcome.raw
    assert outcome.text
    assert spent == {"faults": fault, "injected": 1}


def test_retry_count_comes_from_config(stack: Stack) -> None:
    stack.set_faults("nudging", "http_503*1")
    try:
        outcome = ask(stack, "no-retry", stream=False)
        spent = httpx.get(stack.upstreams["nudging"] + "/faults").json()
    finally:
        stack.clear()
    assert (outcome.status, outcome.code) == (503, "upstream_unavailable")
    assert spent == {"faults": "http_503*1", "injected": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_nudger_failure_falls_back_to_the_base_model(stack: Stack, stream: bool) -> None:
    stack.set_faults("nudging", "http_503")
    try:
        fallen_back = ask(stack, "fallback", stream=stream)
        strict = ask(stack, "nudged", stream=stream)
    finally:
        stack.clear()
    assert (fallen_back.status, fallen_back.code) == (200, None), fallen_back.raw
    assert fallen_back.text
    assert fallen_back.body is not None
    report = fallen_back.body["choices"][0]["nudging"]  # reported although not asked for
    assert report["fallback"] == "base_only"
    assert "nudging upstream" in report["fallback_reason"] and "503" in report["fallback_reason"]
    assert {span["source"] for span in report["spans"]} == {"base"}
    assert (strict.status, strict.code) == (503, "upstream_unavailable")
    healthy = ask(stack, "fallback", stream=stream)
    assert healthy.body is not None and "nudging" not in healthy.body["choices"][0]


def test_base_failure_does_not_fall_back(stack: Stack) -> None:
    stack.set_faults("base", "http_500")
    try:
        outcome = ask(stack, "fallback", stream=False)
    finally:
        stack.clear()
    assert (outcome.status, outcome.code) == (502, "upstream_error")


# --- An answer that never ends -------------------------------------------------------------


class EndlessUpstream:
    """A raw ASGI upstream whose completion never ends: one JSON body, or one line of a stream,
    that grows until its client leaves (which `left` records)."""

    def __init__(self) -> None:
        self.left = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = bool(json.loads(body or b"{}").get("stream"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream" if stream else b"application/json")]})
        await send({"type": "http.response.body", "body": b'data: {"text": "' if stream else b'{"text": "',
                    "more_body": True})
        disconnected = asyncio.ensure_future(receive())  # the next message is the disconnect
        while not disconnected.done():
            await send({"type": "http.response.body", "body": b"x" * 8192, "more_body": True})
            await asyncio.sleep(0)
        self.left.set()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_endless_answer_stops_at_its_cap(stream: bool) -> None:
    upstream = EndlessUpstream()
    with running(upstream) as url:
        config = parse_config({"models": [{"name": "base-only", "method": "base_only", "base": {
            "url": url + "/v1", "model": "base", "dialect": "vllm", "timeouts": TIMEOUTS, **CAPS}}]})
        with running(create_proxy(config)) as proxy:
            outcome = ask(Stack(proxy, {}), "base-only", stream=stream)
            assert upstream.left.wait(5), "the proxy kept reading"
    # Before its first event, so a stream too is a 502.
    assert (outcome.status, outcome.code) == (502, "upstream_error"), outcome.raw
    assert "The base model" in outcome.message and "answer too large" in outcome.message
    assert len(outcome.raw) < 1000  # none of the endless answer reached the client


# --- The simulator's faults, seen directly -------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    with running(create_simulator("base", time_scale=0.02, faults="kind=tokenize:http_503")) as url:
        yield url


def open_requests(url: str) -> int:
    return int(httpx.get(url + "/stats").json()["open_requests"])


def wait_until(condition: Any, failure: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def test_control_endpoint(simulator: str) -> None:
    assert httpx.get(simulator + "/faults").json() == {"faults": "kind=tokenize:http_503", "injected": 0}
    assert httpx.post(simulator + "/tokenize", json={"prompt": "hi"}).status_code == 503
    assert httpx.get(simulator + "/faults").json()["injected"] == 1
    refused = httpx.post(simulator + "/faults", json={"faults": "kind=tokenize:slow"})
    assert refused.status_code == 400
    assert "slow only applies to" in refused.json()["error"]["message"]
    assert httpx.post(simulator + "/faults", json={"faults": 3}).status_code == 400
    assert httpx.post(simulator + "/tokenize", json={"prompt": "hi"}).status_code == 503  # still in force
    assert httpx.post(simulator + "/faults", json={"faults": None}).json() == {"faults": "", "injected": 0}
    assert httpx.post(simulator + "/tokenize", json={"prompt": "hi"}).json()["count"] == 1
    # /v1/models, /health and /stats: only `models` faults touch the first, nothing the others.
    httpx.post(simulator + "/faults", json={"faults": "kind=models:http_500=empty,refuse"})
    try:
        models = httpx.get(simulator + "/v1/models")
        assert (models.status_code, models.content) == (500, b"")
        assert httpx.get(simulator + "/health").status_code == 200
        assert httpx.get(simulator + "/stats").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(simulator + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    finally:
        httpx.post(simulator + "/faults", json={"faults": ""})


COMPLETION = {"prompt": "Why is the sky blue?\n", "max_tokens": 6, "logprobs": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", ["stall", "delay=30", "slow=30"])
def test_a_held_request_is_open_until_its_client_leaves(simulator: str, fault: str, stream: bool) -> None:
    async def ask_and_leave() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            asking = asyncio.create_task(
                client.post(simulator + "/v1/completions", json={**COMPLETION, "stream": stream}))
            while (await client.get(simulator + "/stats")).json()["open_requests"] != 1:
                assert not asking.done(), "the held request was answered"
                await asyncio.sleep(0.01)
            asking.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await asking

    httpx.post(simulator + "/faults", json={"faults": fault})
    try:
        asyncio.run(asyncio.wait_for(ask_and_leave(), 20))
    finally:
        httpx.post(simulator + "/faults", json={"faults": ""})
    wait_until(lambda: open_requests(simulator) == 0, "the request stayed open after its client left")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", ["refuse", "http_500", "malformed", "stream_cut", "no_logprobs",
                                   "context_overflow", "malformed=0", "stream_cut=0"])
def test_every_fault_leaves_no_open_request(simulator: str, fault: str, stream: bool) -> None:
    httpx.post(simulator + "/faults", json={"faults": fault})
    try:
        with httpx.Client(timeout=30) as client, contextlib.suppress(httpx.TransportError):
            client.post(simulator + "/v1/completions", json={**COMPLETION, "stream": stream}).read()
    finally:
        httpx.post(simulator + "/faults", json={"faults": ""})
    wait_until(lambda: open_requests(simulator) == 0, "a faulted request stayed open")


def test_faulted_answers_look_as_documented(simulator: str) -> None:
    def answer(fault: str, stream: bool) -> httpx.Response:
        httpx.post(simulator + "/faults", json={"faults": fault})
        try:
            return httpx.post(simulator + "/v1/completions", json={**COMPLETION, "stream": stream})
        finally:
            httpx.post(simulator + "/faults", json={"faults": ""})

    no_logprobs = answer("no_logprobs", False).json()
    assert no_logprobs["choices"][0]["logprobs"] is None and no_logprobs["choices"][0]["text"]
    overflow = answer("context_overflow", False)
    assert overflow.status_code == 400
    assert overflow.json()["error"]["message"].startswith(
        "This model's maximum context length is 4096 tokens. However, your prompt contains "
    )
    malformed = answer("malformed", False)
    with pytest.raises(ValueError):
        malformed.json()
    events = [line for line in answer("malformed=1", True).text.splitlines() if line.startswith("data:")]
    assert len(events) == 2 and "[DONE]" not in events[-1]
    json.loads(events[0][5:])
    with pytest.raises(ValueError):
        json.loads(events[1][5:])
    empty = answer("http_503=empty", True)
    assert (empty.status_code, empty.content) == (503, b"")
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        answer("stream_cut=1", True)


def test_context_overflow_mid_generation_ends_with_length(stack: Stack) -> None:
    body = {"model": "nudged", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 60,
            "nudging": {"return_provenance": True}}
    whole = httpx.post(stack.proxy + "/v1/chat/completions", json=body, timeout=30).json()
    text = whole["choices"][0]["message"]["content"]
    # A word the base prompt contains only once the answer has got that far.
    half = len(text) // 2
    marker = next(word for word in text[half:].split() if word.isalpha() and len(word) > 3
                  and word not in text[:half] and word not in QUESTION)
    stack.set_faults("base", f"prompt~{marker}:context_overflow")
    try:
        cut = httpx.post(stack.proxy + "/v1/chat/completions", json=body, timeout=30).json()
    finally:
        stack.clear()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["nudging"]["stop_reason"] == "context_length"
    # The base may write the word itself; the next request that carries it is refused.
    assert choice["message"]["content"] and text.startswith(choice["message"]["content"])
    assert len(choice["message"]["content"]) < len(text)
