"""Run the simulated upstreams a config points at, then the proxy, and stop them together.

Every local upstream (host 127.0.0.1 or localhost) becomes one simulator process whose
profile is the upstream's `model` field (base, aligned or aligned-base).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from .config import Config, ConfigError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
PROFILES = frozenset({"base", "aligned", "aligned-base"})


def local_simulators(config: Config) -> dict[int, str]:
    """Port -> profile of every local upstream in the config."""
    simulators: dict[int, str] = {}
    for model in config.models:
        for upstream in (model.base, model.nudging):
            if upstream is None:
                continue
            parts = urlsplit(upstream.url)
            if parts.hostname not in LOCAL_HOSTS or parts.port is None:
                continue
            if upstream.model not in PROFILES:
                raise ConfigError(
                    f"models.{model.name}: local upstream model {upstream.model!r} is not a simulator "
                    f"profile ({', '.join(sorted(PROFILES))})"
                )
            if simulators.setdefault(parts.port, upstream.model) != upstream.model:
                raise ConfigError(f"port {parts.port} is given two simulator profiles")
    return simulators


def _wait_healthy(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"simulator on port {port} exited with code {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"simulator on port {port} did not become healthy")


def run_stack(config: Config, *, time_scale: float, serve: Callable[[], None]) -> None:
    try:
        simulators = local_simulators(config)
    except ConfigError as error:
        sys.exit(f"nudging-proxy: {error}")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port, profile in simulators.items():
            command = [sys.executable, "-m", "server.cli", "simulate", "--host", "127.0.0.1",
                       "--port", str(port), "--profile", profile, "--time-scale", str(time_scale)]
            processes.append(subprocess.Popen(command))
        deadline = time.monotonic() + 30
        for (port, _), process in zip(simulators.items(), processes, strict=True):
            _wait_healthy(port, process, deadline)
        print(f"simulators ready: {', '.join(f'{p} on :{port}' for port, p in simulators.items())}",
              flush=True)
        serve()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
