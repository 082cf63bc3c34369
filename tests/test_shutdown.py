"""SIGTERM to a real `nudging-proxy serve` (one process, or two workers): it stops accepting
connections, lets a running stream finish within `shutdown_grace_seconds`, ends one that
outlasts it with an error event and [DONE], and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from upstreams.simulator.app import create_app as create_simulator

from .servers import running, serve_process


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    # The real latency model: 30 ms per base token, so a stream lasts as long as a test needs.
    with running(create_simulator("base", time_scale=1.0)) as url:
        yield url


def refuses_connections(port: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def open_requests(simulator: str) -> int:
    return int(httpx.get(simulator + "/stats").json()["open_requests"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_running_stream_finishes_after_sigterm(tmp_path: Path, simulator: str, workers: int) -> None:
    with serve_process(tmp_path, simulator, grace=30, workers=workers) as (process, port):
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 150, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                          timeout=60) as response:
            stream = events(response.iter_lines())
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            assert refuses_connections(port)
            rest = list(stream)
        assert rest[-1] == "[DONE]"
        chunks = [first, *rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for chunk in chunks if chunk["choices"][0]["text"]) == 150
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stream_outlasting_the_grace_period_ends_with_an_error_event(
    tmp_path: Path, simulator: str, workers: int
) -> None:
    with serve_process(tmp_path, simulator, grace=1, workers=workers) as (process, port):
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                          timeout=60) as response:
            stream = events(response.iter_lines())
            next(stream)
            process.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["code"] == "server_shutting_down"
        assert "finish_reason" not in json.dumps(rest[-2])
        assert process.wait(timeout=30) == 0
    # The upstream stream was closed too.
    deadline = time.monotonic() + 10
    while open_requests(simulator) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_requests(simulator) == 0
