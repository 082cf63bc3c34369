"""`sim-stack` watches its upstreams: a dead one is reported, named in errors, and restarted.

The real command runs as a child process on free ports; its upstreams are killed from here
as a crash would kill them (SIGSEGV), and the command's own terminal output is read back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cli.stack import MAX_RESTARTS

from .servers import free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    proxy: str
    aligned_port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def aligned_pid(self) -> int:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"simulate" in command and str(self.aligned_port).encode() in command:
                return int(entry.name)
        raise AssertionError(f"no simulator on port {self.aligned_port}:\n{self.output()}")


def _wait(condition, seconds: float, what: str, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds} s; output:\n{stack.output()[-3000:]}")


def _ready(stack: Stack) -> int | None:
    try:
        return httpx.get(stack.proxy + "/ready", timeout=5).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    base, aligned, proxy = free_port(), free_port(), free_port()
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"name": "nudged", "base": {"url": f"http://127.0.0.1:{base}/v1", "model": "base"},
         "nudging": {"url": f"http://127.0.0.1:{aligned}/v1", "model": "aligned",
                     "chat_template": "chatml"}}]}))
    log = tmp_path / "stack.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "sim-stack", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(proxy), "--time-scale", "0"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    running = Stack(process, f"http://127.0.0.1:{proxy}", aligned, log)
    try:
        _wait(lambda: _ready(running) == 200, STARTUP_SECONDS, "the stack was not ready", running)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def _chat(stack: Stack) -> httpx.Response:
    return httpx.post(stack.proxy + "/v1/chat/completions", timeout=30, json={
        "model": "nudged", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello there"}]})


def test_a_crashed_upstream_is_reported_named_in_errors_and_restarted(stack: Stack) -> None:
    os.kill(stack.aligned_pid(), signal.SIGSEGV)
    report = "the upstream 'aligned' on port {} was killed by SIGSEGV (exit status 139)"
    _wait(lambda: report.format(stack.aligned_port) in stack.output(), 10,
          "the crash was not reported", stack)
    statuses: list[int | None] = []
    errors: list[str] = []

    def down_seen() -> bool:
        statuses.append(_ready(stack))
        answer = _chat(stack)
        if answer.status_code == 502:
            errors.append(answer.json()["error"]["message"])
        # /ready answers from a check at most a second old: it may say 200 for that long.
        return bool(errors) and "was killed by SIGSEGV" in errors[-1] and 503 in statuses

    _wait(down_seen, 30, "no request failed naming the crash while /ready said 503", stack)
    assert errors[-1].startswith("The nudging model's server failed: unreachable")
    assert "its local process 'aligned' was killed by SIGSEGV (exit status 139)" in errors[-1]
    assert "127.0.0.1" not in errors[-1]  # addresses never reach clients
    _wait(lambda: _ready(stack) == 200, STARTUP_SECONDS, "the upstream did not come back", stack)
    assert "restarting 'aligned' (1 of" in stack.output()
    assert _chat(stack).status_code == 200


def test_an_upstream_that_keeps_failing_stops_the_stack_with_status_1(stack: Stack) -> None:
    for attempt in range(MAX_RESTARTS + 1):
        os.kill(stack.aligned_pid(), signal.SIGKILL)
        if attempt < MAX_RESTARTS:
            restarted = f"restarting 'aligned' ({attempt + 1} of {MAX_RESTARTS})"
            _wait(lambda text=restarted: text in stack.output() and _ready(stack) == 200,
                  STARTUP_SECONDS, f"restart {attempt + 1} did not serve", stack)
    assert stack.process.wait(timeout=60) == 1
    output = stack.output()
    assert f"the upstream 'aligned' failed {MAX_RESTARTS + 1} times; stopping" in output
    assert "stopped because an upstream kept failing" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.proxy + "/health")
