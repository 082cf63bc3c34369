"""`nudging-proxy serve --workers 2` over real HTTP: requests spread over two worker
processes, and `/metrics` (from any worker) counts every one of them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli import build_parser
from nudging_core.config import ConfigError, parse_config
from upstreams.simulator.app import create_app as create_simulator

from .servers import running, serve_process
from .test_metrics import Samples, scrape

COMPLETIONS = "/v1/completions"
REQUESTS = 40


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    with running(create_simulator("base", time_scale=0.2)) as url:
        yield url


def metrics_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("nudging-proxy-metrics-*"))


def workers_counting(tmp: Path) -> set[str]:
    """The worker processes that have counted something: each writes counter_<pid>.db."""
    return {path.stem.removeprefix("counter_") for path in tmp.glob("nudging-proxy-metrics-*/counter_*.db")}


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under `parent` (not multiprocessing's resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in command:
            pids.append(int(stat.parent.name))
    return pids


async def send_requests(port: int) -> None:
    """REQUESTS requests, half streamed, 16 at a time, each on a connection of its own (a
    worker serves a connection's every request)."""
    limit = asyncio.Semaphore(16)

    async def one(index: int) -> None:
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 8, "stream": index % 2 == 1}
        async with limit, httpx.AsyncClient(timeout=60) as client:
            response = await client.post(f"http://127.0.0.1:{port}{COMPLETIONS}", json=body)
            assert response.status_code == 200

    await asyncio.gather(*(one(index) for index in range(REQUESTS)))


def answered(samples: Samples) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == "nudging_proxy_requests_total" and ("endpoint", COMPLETIONS) in labels)


def test_metrics_count_the_requests_of_every_worker(tmp_path: Path, simulator: str) -> None:
    with serve_process(tmp_path, simulator, workers=2, env={"TMPDIR": str(tmp_path)}) as (process, port):
        asyncio.run(send_requests(port))
        assert len(workers_counting(tmp_path)) == 2, "both workers served requests"
        # Each scrape on a new connection, whichever worker answers it.
        for _ in range(6):
            samples = scrape(f"http://127.0.0.1:{port}")
            assert answered(samples) == REQUESTS
            tokens = sum(value for (name, _), value in samples.items()
                         if name == "nudging_proxy_completion_tokens_total")
            assert tokens == REQUESTS * 8
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert metrics_dirs(tmp_path) == [], "the metrics directory is removed on exit"


def test_a_killed_worker_leaves_no_request_in_flight(tmp_path: Path, simulator: str) -> None:
    with serve_process(tmp_path, simulator, workers=2) as (process, port):
        proxy = f"http://127.0.0.1:{port}"
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", proxy + COMPLETIONS, json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            for pid in worker_pids(process.pid):
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                list(lines)
        # uvicorn starts new workers; the dead ones' gauges are gone.
        deadline = time.monotonic() + 30
        while True:
            try:
                samples = scrape(proxy)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "no worker came back"
                time.sleep(0.1)
        in_flight = {labels: value for (name, labels), value in samples.items()
                     if name == "nudging_proxy_requests_in_flight"}
        assert in_flight.get(frozenset({("endpoint", COMPLETIONS)}), 0) == 0


def test_workers_is_checked_at_start_up() -> None:
    models = [{"name": "base", "method": "base_only", "base": {"url": "http://127.0.0.1:1/v1", "model": "b"}}]
    assert parse_config({"server": {"workers": 4}, "models": models}).server.workers == 4
    with pytest.raises(ConfigError, match="server.workers"):
        parse_config({"server": {"workers": 0}, "models": models})


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_the_workers_option_takes_a_positive_count(count: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["serve", "--config", "x.yaml", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["serve", "--config", "x.yaml", "--workers", count])
    assert stopped.value.code == 2
    assert "--workers: expected a whole number of at least 1" in capsys.readouterr().err
