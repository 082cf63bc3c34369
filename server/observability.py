"""Per request: its id (from or into `X-Request-Id`, forwarded upstream), its access log line
and its metrics. The middleware opens an `Observation`; routes fill in the model and wrap the
generation's events so the first text, tokens per source and stream errors are seen."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nudging_core.provenance import tokens_by_source
from nudging_core.service import ChoiceFinished, ErrorEvent, Event, PieceEvent
from nudging_core.types import Piece
from nudging_core.upstream.client import RequestScope, request_scope

from .logs import REQUEST_ID_HEADER, access_log, request_id_from, upstream_log
from .metrics import Metrics

T = TypeVar("T")

# Metric label for any other path, so random URLs cannot grow the label set.
KNOWN_ENDPOINTS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
     "/health", "/ready", "/metrics"}
)


@dataclass(slots=True)
class Observation:
    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    model: str = ""  # a configured model name, once the request named one
    first_text_at: float | None = None
    tokens: dict[str, int] = field(default_factory=lambda: {"base": 0, "nudging": 0})
    nudging_ratios: list[float] = field(default_factory=list)
    stream_error: bool = False


_observation: ContextVar[Observation | None] = ContextVar("observation", default=None)


def note_model(name: str) -> None:
    observation = _observation.get()
    if observation is not None:
        observation.model = name


def note_stream_error() -> None:
    """A stream that had started was ended by an error event."""
    observation = _observation.get()
    if observation is not None:
        observation.stream_error = True


async def observed(
    events: AsyncGenerator[Event, None], *, nudged: bool, stream: bool
) -> AsyncGenerator[Event, None]:
    """`events` unchanged, noting what the request's metrics and log line need."""
    observation = _observation.get() or Observation(request_id="", endpoint="")
    yielded = False
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, ChoiceFinished):
                    _note_choice(observation, event.choice.pieces, nudged=nudged)
                elif isinstance(event, PieceEvent):
                    if event.piece.text and observation.first_text_at is None:
                        observation.first_text_at = time.perf_counter()
                elif isinstance(event, ErrorEvent):
                    _note_failure(observation, stream=stream, started=yielded)
                yielded = True
                yield event
    except Exception:
        _note_failure(observation, stream=stream, started=yielded)
        raise


def note_forwarded_answer(answer: Mapping[str, Any], source: str) -> None:
    """A chat passthrough's whole answer: its tokens, as the upstream's usage counts them."""
    observation = _observation.get()
    if observation is not None:
        observation.first_text_at = time.perf_counter()
        observation.tokens[source] += _completion_tokens(answer) or 0


async def observed_forward(
    chunks: AsyncGenerator[T, None], source: str
) -> AsyncGenerator[T, None]:
    """A chat passthrough's stream chunks unchanged, noting its first text and its tokens: the
    upstream's usage chunk if it sends one, else one per chunk with text (vLLM's granularity)."""
    observation = _observation.get() or Observation(request_id="", endpoint="")
    text_chunks, usage_tokens = 0, None
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                if isinstance(chunk, Mapping):
                    usage_tokens = _completion_tokens(chunk) or usage_tokens
                    if _has_text(chunk):
                        text_chunks += 1
                        if observation.first_text_at is None:
                            observation.first_text_at = time.perf_counter()
                else:
                    _note_failure(observation, stream=True, started=True)
                yield chunk
    finally:
        observation.tokens[source] += usage_tokens if usage_tokens is not None else text_chunks


def _completion_tokens(answer: Mapping[str, Any]) -> int | None:
    usage = answer.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _has_text(chunk: Mapping[str, Any]) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(choice, Mapping) and isinstance(choice.get("delta"), Mapping)
        and bool(choice["delta"].get("content") or choice["delta"].get("tool_calls"))
        for choice in choices
    )


def _note_failure(observation: Observation, *, stream: bool, started: bool) -> None:
    # A failure once a stream has started reaches the client as an error event; before that,
    # or without streaming, as an HTTP status the middleware counts.
    observation.stream_error = stream and started


def _note_choice(observation: Observation, pieces: list[Piece], *, nudged: bool) -> None:
    # Counted from a finished choice's pieces: those of an attempt that was retried are gone.
    counts = tokens_by_source(pieces)
    for source, count in counts.items():
        observation.tokens[source] += count
    total = sum(counts.values())
    if nudged and total:
        observation.nudging_ratios.append(counts["nudging"] / total)


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope).get(REQUEST_ID_HEADER))
        path = scope["path"]
        observation = Observation(request_id, path if path in KNOWN_ENDPOINTS else "other")
        status = 500  # if the app fails before answering, the server answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        scope_token = request_scope.set(RequestScope(request_id, self._observe_upstream))
        observation_token = _observation.set(observation)
        in_flight = self.metrics.in_flight.labels(observation.endpoint)
        in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            in_flight.dec()
            self._record(observation, scope["method"], path, status)
            _observation.reset(observation_token)
            request_scope.reset(scope_token)

    def _observe_upstream(self, role: str, outcome: str, seconds: float) -> None:
        self.metrics.observe_upstream(role, outcome, seconds)
        if outcome != "cancelled" and not outcome.startswith("2"):
            # By role: the upstream's address stays out of the logs.
            upstream_log.warning(
                "%s upstream request failed: %s", role, outcome,
                extra={"role": role, "outcome": outcome, "duration_ms": round(seconds * 1000, 1)},
            )

    def _record(self, observation: Observation, method: str, path: str, status: int) -> None:
        o, m = observation, self.metrics
        duration = time.perf_counter() - o.started
        m.requests.labels(o.model, o.endpoint, str(status)).inc()
        m.duration.labels(o.model, o.endpoint).observe(duration)
        if status >= 400 or o.stream_error:
            m.errors.labels(o.model, o.endpoint, "stream" if status < 400 else str(status)).inc()
        time_to_first_text = None if o.first_text_at is None else o.first_text_at - o.started
        if time_to_first_text is not None:
            m.first_token.labels(o.model, o.endpoint).observe(time_to_first_text)
        for source, count in o.tokens.items():
            if count:
                m.tokens.labels(o.model, source).inc(count)
        for ratio in o.nudging_ratios:
            m.nudging_ratio.labels(o.model).observe(ratio)
        fields: dict[str, object] = {
            "method": method, "path": path, "status": status, "duration_ms": round(duration * 1000, 1),
        }
        if o.model:
            fields["model"] = o.model
        if time_to_first_text is not None:
            fields["first_text_ms"] = round(time_to_first_text * 1000, 1)
        if any(o.tokens.values()):
            fields["tokens"] = dict(o.tokens)
        if o.stream_error:
            fields["stream_error"] = True
        access_log.info("%s %s %s", method, path, status, extra=fields)
