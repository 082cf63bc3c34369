"""Simulators and a proxy as separate processes, as deployed, for the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], health: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with code {process.returncode}")
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def _process(command: list[str], url: str, health: str = "/health",
             env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=None if env is None else {**os.environ, **env})
    try:
        _wait_healthy(url, process, health)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def simulator(profile: str, time_scale: float) -> Iterator[str]:
    """A simulated upstream (`base`, `aligned`) in its own process; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*CLI, "simulate", "--host", "127.0.0.1", "--port", str(port), "--profile", profile,
               "--time-scale", str(time_scale)]
    with _process(command, url):
        yield url


@contextmanager
def proxy(models: list[dict[str, Any]], server: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
    """`nudging-proxy serve` with these models (and `server` settings); yields its URL and
    process id."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "proxy.yaml"
        settings = {**(server or {}), "host": "127.0.0.1", "port": port}
        config.write_text(yaml.safe_dump({"server": settings, "models": models}))
        with _process([*CLI, "serve", "--config", str(config)], url) as process:
            yield url, process.pid


def has_litellm_proxy(python: str) -> bool:
    """Whether `python` can run LiteLLM's proxy (`pip install litellm[proxy]`, the `bench` extra)."""
    done = subprocess.run([python, "-c", "import litellm.proxy.proxy_server"], capture_output=True)
    return done.returncode == 0


@contextmanager
def litellm_proxy(python: str, name: str, upstream: str) -> Iterator[str]:
    """LiteLLM's proxy (one worker, no database, no callbacks) serving model `name` from the
    OpenAI-compatible completions API at `upstream` (…/v1); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `text-completion-openai/`: LiteLLM passes /v1/completions on as completions, not as chat.
    model = {"model_name": name, "litellm_params": {
        "model": f"text-completion-openai/{name}", "api_base": upstream, "api_key": "unused"}}
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "litellm.yaml"
        config.write_text(yaml.safe_dump({"model_list": [model], "litellm_settings": {"telemetry": False}}))
        command = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--host", "127.0.0.1",
                   "--port", str(port), "--num_workers", "1"]
        # The bundled model price list rather than a download at start; errors only in its log;
        # no API keys, as for our proxy (LiteLLM refuses to start without one unless told).
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
        with _process(command, url, health="/health/liveliness", env=env):
            yield url


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
