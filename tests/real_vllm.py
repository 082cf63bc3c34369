"""Two real vLLM servers on the CPU for the `vllm`-marked tests, started by the project's own
script (`scripts/vllm-cpu.sh`): SmolLM2-135M-Instruct (the aligned model) and Gemma 3 270M (the
base model).

The servers are started once per test session, on free ports, with their pid and log files in
a directory of their own, and stopped at its end. `NUDGING_SKIP_REAL_VLLM=1` skips the tests
that need them (the only way to skip them: a failed install or start is a test failure).
`NUDGING_REAL_VLLM_URLS=http://127.0.0.1:8031,http://127.0.0.1:8032` (smollm2, gemma3-270m)
uses servers already running instead, and leaves them running.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "vllm-cpu.sh"
SKIP_ENV = "NUDGING_SKIP_REAL_VLLM"
URLS_ENV = "NUDGING_REAL_VLLM_URLS"
SMOL = "smollm2"
GEMMA = "gemma3-270m"


@dataclass
class Timings:
    """What the terminal summary reports (tests/conftest.py)."""

    vllm_version: str | None = None
    start_seconds: float | None = None  # install (when needed) and start of both servers
    tests_started: float | None = None
    reused: bool = False
    notes: list[str] = field(default_factory=list)


TIMINGS = Timings()


@dataclass(frozen=True)
class VllmPair:
    smol_url: str  # server root, without /v1
    gemma_url: str
    run_dir: Path | None  # None: servers started by someone else

    def stop(self) -> None:
        if self.run_dir is not None:
            subprocess.run([str(SCRIPT), "stop"], env=_script_env(self.run_dir), check=False,
                           timeout=120)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _script_env(run_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_RUN_DIR": str(run_dir), **extra}


def _version(url: str) -> str:
    return str(httpx.get(f"{url}/version", timeout=10).json()["version"])


def start_pair() -> VllmPair:
    """Start (or find) the two servers; raises with the script's output when that fails."""
    started = time.monotonic()
    given = os.environ.get(URLS_ENV)
    if given:
        smol_url, gemma_url = (u.rstrip("/") for u in given.split(","))
        pair = VllmPair(smol_url, gemma_url, None)
        TIMINGS.reused = True
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="vllm-cpu-run-"))
        smol_port, gemma_port = _free_port(), _free_port()
        done = subprocess.run(
            [str(SCRIPT), "start"],
            env=_script_env(run_dir, PORT_SMOL=str(smol_port), PORT_GEMMA=str(gemma_port)),
            capture_output=True, text=True, timeout=3600, check=False,
        )
        pair = VllmPair(f"http://127.0.0.1:{smol_port}", f"http://127.0.0.1:{gemma_port}", run_dir)
        if done.returncode != 0:
            pair.stop()
            raise RuntimeError(
                f"scripts/vllm-cpu.sh start failed ({done.returncode}):\n{done.stderr[-4000:]}"
            )
    TIMINGS.start_seconds = time.monotonic() - started
    TIMINGS.vllm_version = _version(pair.gemma_url)
    TIMINGS.tests_started = time.monotonic()
    return pair


@contextmanager
def extra_server(model: str, name: str, *flags: str) -> Iterator[str]:
    """One more server of a converted model ("smol" or "gemma") with extra vLLM flags, for as
    long as the block runs; yields its root URL."""
    run_dir = Path(tempfile.mkdtemp(prefix="vllm-cpu-extra-"))
    port = _free_port()
    started = time.monotonic()
    env = _script_env(run_dir)
    try:
        done = subprocess.run([str(SCRIPT), "serve", model, name, str(port), *flags], env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"scripts/vllm-cpu.sh serve {model} failed ({done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        TIMINGS.notes.append(f"extra server {name}: started in {time.monotonic() - started:.0f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(SCRIPT), "stop-one", name], env=env, check=False, timeout=120)


def summary_lines() -> list[str]:
    if TIMINGS.vllm_version is None:
        return []
    how = "servers already running" if TIMINGS.reused else "install if needed + start of both servers"
    lines = [f"real vLLM {TIMINGS.vllm_version}: {how} {TIMINGS.start_seconds:.0f} s"]
    if TIMINGS.tests_started is not None:
        lines.append(f"real vLLM tests: {time.monotonic() - TIMINGS.tests_started:.0f} s")
    lines.extend(TIMINGS.notes)
    return lines
