"""Fault injection: the simulator misbehaving on purpose, so the proxy can be tested against it.

A fault spec is a comma-separated list of rules; each request takes the first rule that
matches it and whose dice roll (its rate) comes up, and suffers that rule's fault::

    RULE   := [FILTER ":"]... FAULT ["=" ARG] ["@" RATE] ["*" COUNT]
    FILTER := "kind=" KIND ["|" KIND]...   the request kinds it hits (default: stream|non-stream)
            | "prompt~" TEXT               only prompts containing TEXT (no "," or ":" in it)
    KIND   := stream | non-stream | models | tokenize
    RATE   := probability in [0, 1] (default 1)
    COUNT  := hit at most this many requests, then the rule is spent

``stream`` and ``non-stream`` are ``POST /v1/completions``; ``models`` is ``GET /v1/models``,
``tokenize`` is ``POST /tokenize``. ``/health``, ``/stats`` and ``/faults`` are never faulted.
Examples: ``stream_cut@0.2,http_503``, ``kind=stream:stall``, ``http_503=empty*1``,
``prompt~sky:delay=3``, ``kind=models|tokenize:refuse``.

Faults (ARG in brackets, with its default):

- ``refuse``: close the connection without answering.
- ``delay[=2]``: wait this many seconds before the response headers, then answer normally.
- ``slow[=0.2]``: completions only; this many extra seconds before every token.
- ``http_NNN[=empty]``: answer with HTTP status NNN (400-599) and a vLLM error body, or none.
- ``malformed[=2]``: a body that is not JSON; a stream sends ARG good events, then a broken one.
- ``stream_cut[=2]``: close the connection mid-answer: a stream after ARG events (without
  ``[DONE]``), any other answer halfway through its JSON body.
- ``stall[=2]``: stop sending but keep the connection open until the client leaves: a stream
  after ARG events, any other answer after the headers and the start of its body.
- ``misshapen[=0]``: completions only; valid JSON of the wrong shape, number ARG of
  ``MISSHAPEN`` (choices not a list, a number for text, a string for logprobs, ...): the whole
  answer, or a stream's second event.
- ``no_logprobs``: completions only; the answer carries ``"logprobs": null``.
- ``oversized[=1024]``: completions only; the answer padded (a ``"padding"`` string field) to
  about ARG KiB: the whole JSON body, or a stream's second event.
- ``context_overflow``: completions only; vLLM's 400 "This model's maximum context length is
  N tokens. However, you requested M tokens (...)".

While a fault holds a request (a delay, a stall) the request counts in ``/stats``
``open_requests``, until it ends or its client leaves.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..openai_api import ApiError
from .engine import Stats

KINDS: Final = ("stream", "non-stream", "models", "tokenize")
COMPLETIONS: Final = frozenset({"stream", "non-stream"})
ALL_KINDS: Final = frozenset(KINDS)

# Where a request's scope holds the function that closes its connection (see SimulatorApp).
CLOSE_CONNECTION: Final = "nudging.simulator.close_connection"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _FaultKind:
    kinds: frozenset[str]  # the request kinds this fault can hit
    default: float | None  # its argument's default; None: it takes no number


_FAULTS: Final[dict[str, _FaultKind]] = {
    "refuse": _FaultKind(ALL_KINDS, None),
    "delay": _FaultKind(ALL_KINDS, 2.0),
    "slow": _FaultKind(COMPLETIONS, 0.2),
    "http": _FaultKind(ALL_KINDS, None),
    "malformed": _FaultKind(ALL_KINDS, 2),
    "stream_cut": _FaultKind(ALL_KINDS, 2),
    "stall": _FaultKind(ALL_KINDS, 2),
    "misshapen": _FaultKind(COMPLETIONS, 0),
    "no_logprobs": _FaultKind(COMPLETIONS, None),
    "context_overflow": _FaultKind(COMPLETIONS, None),
    "oversized": _FaultKind(COMPLETIONS, 1024),
}
_EVENT_COUNTS: Final = frozenset({"malformed", "stream_cut", "stall"})
_WHOLE_NUMBER_ARGS: Final = _EVENT_COUNTS | {"misshapen", "oversized"}
# The events of a stream that go out before its fault (besides _EVENT_COUNTS' own argument).
STREAM_FAULTS: Final = _EVENT_COUNTS | {"misshapen"}

# Answers a buggy or foreign server could send: JSON, but not the completions shape.
MISSHAPEN: Final[tuple[Any, ...]] = (
    {"choices": "text"},
    {"choices": [None]},
    {"choices": [{"index": 0, "text": 5}]},
    {"choices": [{"index": 0, "text": "a", "logprobs": "none"}]},
    {"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": 5}}]},
    {"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": ["x"],
                                                         "top_logprobs": [{"a": "x"}]}}]},
    {"choices": [{"index": 0, "text": "a", "finish_reason": 7}]},
    {"choices": [{"index": 0, "text": "a"}], "usage": {"prompt_tokens": "3", "completion_tokens": []}},
    ["not", "an", "object"],
)

_RULE = re.compile(r"(?P<name>[a-z_0-9]+)(?:=(?P<arg>[^@*]*))?(?:@(?P<rate>[^*]*))?(?:\*(?P<count>[^*]*))?")


class FaultSpecError(ValueError):
    """A fault spec that does not follow the grammar; the message names the bad rule."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One rule of a fault spec."""

    name: str  # a key of _FAULTS ("http" for http_NNN)
    amount: float = 0.0  # seconds (delay, slow) or good stream events first (malformed, cut, stall)
    status: int = 0  # http_NNN only
    empty_body: bool = False  # http_NNN=empty
    rate: float = 1.0
    count: int | None = None
    kinds: frozenset[str] = COMPLETIONS
    prompt: str | None = None

    def matches(self, kind: str, prompt: str | None) -> bool:
        if kind not in self.kinds:
            return False
        return self.prompt is None or (prompt is not None and self.prompt in prompt)

    @property
    def events(self) -> int:
        return int(self.amount)


def parse_faults(spec: str) -> list[Fault]:
    """The rules of a spec, in order; an empty spec has none."""
    return [_parse_rule(rule.strip()) for rule in spec.split(",") if rule.strip()]


def _parse_rule(rule: str) -> Fault:
    *filters, body = rule.split(":")
    kinds: frozenset[str] | None = None
    prompt: str | None = None
    for item in filters:
        if item.startswith("kind="):
            kinds = frozenset(item[len("kind="):].split("|"))
            unknown = sorted(kinds - ALL_KINDS)
            if unknown:
                raise FaultSpecError(f"{rule!r}: unknown request kind {unknown[0]!r}; use {', '.join(KINDS)}")
        elif item.startswith("prompt~") and len(item) > len("prompt~"):
            prompt = item[len("prompt~"):]
        else:
            raise FaultSpecError(f"{rule!r}: bad filter {item!r}; use kind=KIND[|KIND...] or prompt~TEXT")
    match = _RULE.fullmatch(body)
    if match is None:
        raise FaultSpecError(f"{rule!r}: expected FAULT[=ARG][@RATE][*COUNT]")
    name, arg = match["name"], match["arg"]
    status = 0
    if name.startswith("http_"):
        name, status = "http", _number(rule, name[len("http_"):], int)
        if not 400 <= status <= 599:
            raise FaultSpecError(f"{rule!r}: the HTTP status must be 400-599")
    fault = _FAULTS.get(name)
    if fault is None:
        raise FaultSpecError(f"{rule!r}: unknown fault {name!r}; use "
                             + ", ".join("http_NNN" if n == "http" else n for n in _FAULTS))
    if kinds is None:
        kinds = fault.kinds & COMPLETIONS
    elif not kinds <= fault.kinds:
        raise FaultSpecError(f"{rule!r}: {name} only applies to {', '.join(sorted(fault.kinds))}")
    amount = fault.default or 0.0
    empty_body = False
    if arg is not None:
        if name == "http" and arg == "empty":
            empty_body = True
        elif fault.default is None:
            allowed = " but 'empty'" if name == "http" else ""
            raise FaultSpecError(f"{rule!r}: {name} takes no argument{allowed}")
        else:
            amount = _number(rule, arg, int if name in _WHOLE_NUMBER_ARGS else float)
            if amount < 0:
                raise FaultSpecError(f"{rule!r}: the argument must be >= 0")
    rate = 1.0 if match["rate"] is None else _number(rule, match["rate"], float)
    if not 0 <= rate <= 1:
        raise FaultSpecError(f"{rule!r}: the rate must be between 0 and 1")
    count = None if match["count"] is None else _number(rule, match["count"], int)
    if count is not None and count < 1:
        raise FaultSpecError(f"{rule!r}: the count must be >= 1")
    return Fault(name, amount, status, empty_body, rate, count, kinds, prompt)


def _number(rule: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise FaultSpecError(f"{rule!r}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise FaultSpecError(f"{rule!r}: {text!r} is not a finite number")
    return value


class Faults:
    """The spec in force (changeable at run time) and which rules are spent."""

    def __init__(self, spec: str = "", rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.spec = ""
        self.rules: list[Fault] = []
        self._left: list[int | None] = []
        self.injected = 0
        self.set(spec)

    def set(self, spec: str) -> None:
        """Replace the spec (an empty one clears it); a bad spec leaves the old one in force."""
        self.rules = parse_faults(spec)
        self._left = [rule.count for rule in self.rules]
        self.spec = spec
        self.injected = 0

    def pick(self, kind: str, prompt: str | None = None) -> Fault | None:
        for index, rule in enumerate(self.rules):
            left = self._left[index]
            if left == 0 or not rule.matches(kind, prompt):
                continue
            if rule.rate < 1 and self._rng.random() >= rule.rate:
                continue
            if left is not None:
                self._left[index] = left - 1
            self.injected += 1
            return rule
        return None

    def describe(self) -> dict[str, Any]:
        return {"faults": self.spec, "injected": self.injected}


# ---------------------------------------------------------------------------------------------
# Behaviours


@contextmanager
def held(stats: Stats) -> Iterator[None]:
    """Count a request the fault holds as open while it does."""
    stats.open_requests += 1
    try:
        yield
    finally:
        stats.open_requests -= 1


async def until_disconnected(request: Request) -> None:
    """Return once the client has gone (the request body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def delay(request: Request, seconds: float, stats: Stats) -> bool:
    """Wait before the headers; False if the client left meanwhile."""
    with held(stats):
        try:
            await asyncio.wait_for(until_disconnected(request), seconds)
        except TimeoutError:
            return True
        return False


def close_connection(scope: Scope) -> None:
    close: Callable[[], None] | None = scope.get(CLOSE_CONNECTION)
    if close is None:
        raise RuntimeError("closing a connection needs the server's transport (see SimulatorApp)")
    close()


async def _let_close_land() -> None:
    # The server notices the closed transport on the next turns of the event loop; after that
    # it drops whatever the app still sends instead of writing a 500.
    for _ in range(2):
        await asyncio.sleep(0)


def error_response(fault: Fault) -> Response:
    if fault.empty_body:
        return Response(status_code=fault.status)
    error = ApiError(f"simulated fault: HTTP {fault.status}", fault.status, "SimulatedFault")
    return Response(json.dumps(error.body()), status_code=fault.status, media_type="application/json")


def _partial_body() -> str:
    # The start of a completion body: what a client has when the answer breaks off.
    return '{"id": "cmpl-fault", "object": "text_completion", "choices": [{"index": 0, "text": "'


async def whole_answer_fault(fault: Fault, request: Request, stats: Stats, *,
                             stream: bool = False) -> Response | None:
    """The answer replacing a normal one, or None to answer normally (after any delay).

    Streams answer normally here except for refusals, delays and HTTP errors: their faults
    act on the events (see :func:`disrupt`).
    """
    if fault.name == "refuse":
        close_connection(request.scope)
        await _let_close_land()
        return Response(status_code=499)
    if fault.name == "delay":
        if await delay(request, fault.amount, stats):
            return None
        return Response(status_code=499)  # nobody is listening any more
    if fault.name == "http":
        return error_response(fault)
    if stream or fault.name not in STREAM_FAULTS:
        return None
    if fault.name == "malformed":
        return Response(_partial_body(), media_type="application/json")
    if fault.name == "misshapen":
        return Response(json.dumps(misshapen(fault)), media_type="application/json")
    return StreamingResponse(_broken_body(fault, request.scope, stats), media_type="application/json")


def misshapen(fault: Fault) -> Any:
    return MISSHAPEN[fault.events % len(MISSHAPEN)]


async def _broken_body(fault: Fault, scope: Scope, stats: Stats) -> AsyncIterator[str]:
    with held(stats):
        yield _partial_body()
        if fault.name == "stream_cut":
            close_connection(scope)
            await _let_close_land()
            return
        await asyncio.Event().wait()  # a stall: until the server cancels us as the client leaves


async def disrupt(fault: Fault, events: AsyncGenerator[str, None], scope: Scope) -> AsyncGenerator[str, None]:
    """A stream's events, broken by `fault` after its number of good events."""
    try:
        sent = 0
        good_events = 1 if fault.name == "misshapen" else fault.events
        async for event in events:
            if sent == good_events:
                break
            yield event
            sent += 1
        else:
            return  # the answer was shorter than the fault's allowance
        if fault.name == "malformed":
            yield 'data: {"id": "cmpl-fault", "choices": [\n\n'
            return
        if fault.name == "misshapen":
            yield f"data: {json.dumps(misshapen(fault))}\n\n"
            return
        if fault.name == "stream_cut":
            close_connection(scope)
            await _let_close_land()
            return
        await asyncio.Event().wait()  # a stall: until the server cancels us as the client leaves
    finally:
        await events.aclose()  # the generation behind the events ends with the answer


def padded(answer: dict[str, Any], kib: int) -> dict[str, Any]:
    """An answer grown to about `kib` KiB by a field clients ignore."""
    return {**answer, "padding": "x" * (kib * 1024)}


async def padded_second_event(events: AsyncGenerator[str, None], kib: int) -> AsyncGenerator[str, None]:
    """A stream's events, its second one grown to about `kib` KiB (see `padded`)."""
    try:
        sent = 0
        async for event in events:
            if sent == 1 and event.startswith("data: {"):
                event = f"data: {json.dumps(padded(json.loads(event[len('data: '):]), kib))}\n\n"
            yield event
            sent += 1
    finally:
        await events.aclose()


async def slowed(steps: AsyncGenerator[T, None], seconds: float) -> AsyncGenerator[T, None]:
    """`steps`, each after an extra wait."""
    try:
        async for step in steps:
            await asyncio.sleep(seconds)
            yield step
    finally:
        await steps.aclose()


class ModelsFaults:
    """ASGI middleware: faults of kind ``models`` for ``GET /v1/models``."""

    def __init__(self, app: ASGIApp, faults: Faults, stats: Stats) -> None:
        self.app = app
        self.faults = faults
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/models" and scope["method"] == "GET":
            fault = self.faults.pick("models")
            if fault is not None:
                response = await whole_answer_fault(fault, Request(scope, receive), self.stats)
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def connection_closer(send: Send) -> Callable[[], None] | None:
    """A function that closes the connection `send` answers on, if the server is uvicorn.

    ASGI cannot close a connection without a response; uvicorn's `send` is a method of the
    request's cycle, which holds the connection's transport.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    close = getattr(transport, "close", None)
    return close if callable(close) else None
