"""Prometheus metrics of one app, in a registry of its own (tests build many apps).

With several worker processes (`serve --workers`), prometheus-client's multiprocess mode:
every process writes its values to files in `PROMETHEUS_MULTIPROC_DIR` (the CLI makes the
directory before the workers start, which is when prometheus-client reads it), and `/metrics`
from any worker adds up the files of all of them."""

from __future__ import annotations

import os

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX = "nudging_proxy"
# Seconds: from a millisecond passthrough on a fast upstream to a long nudged answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests answered, by model, endpoint and status",
            ["model", "endpoint", "status"], registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Failed requests: an HTTP error status, or 'stream' for an error event after a stream started",
            ["model", "endpoint", "status"], registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time from request to the end of its response",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from request to the first text of the answer",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being served", ["endpoint"], registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_requests = Counter(
            f"{PREFIX}_upstream_requests",
            "Requests to upstreams, by role and outcome (HTTP status, timeout, unreachable, cancelled)",
            ["role", "outcome"], registry=r,
        )
        self.upstream_latency = Histogram(
            f"{PREFIX}_upstream_response_seconds",
            "Time until an upstream's response headers (a streamed answer's first byte)",
            ["role", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            f"{PREFIX}_completion_tokens", "Answer tokens sent to clients, by the model that wrote them",
            ["model", "source"], registry=r,
        )
        self.nudging_ratio = Histogram(
            f"{PREFIX}_nudging_token_ratio",
            "Per nudged answer: the share of its tokens the aligned model wrote",
            ["model"], buckets=RATIO_BUCKETS, registry=r,
        )

        # Admission control (server/admission.py).
        self.admission_queued = Gauge(
            f"{PREFIX}_admission_queued", "Requests waiting for their model's admission", ["model"],
            registry=r, multiprocess_mode="livesum",  # with workers: the waits of every live one
        )
        self.admission_rejected = Counter(
            f"{PREFIX}_admission_rejected",
            "Requests answered 429 by admission control: the queue was full, or the wait ran out",
            ["model"], registry=r,
        )

    def observe_upstream(self, role: str, outcome: str, seconds: float) -> None:
        """The `nudging_core` upstream observer hook."""
        self.upstream_requests.labels(role, outcome).inc()
        self.upstream_latency.labels(role, outcome).observe(seconds)

    def render(self) -> bytes:
        directory = multiprocess_directory()
        if directory is None:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_process, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(every_process)


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


def forget_process(pid: int) -> None:
    """Drop the live gauges (requests in flight) of a worker process that has ended, however
    it ended; what it counted still counts."""
    directory = multiprocess_directory()
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
