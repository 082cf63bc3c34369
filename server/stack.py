"""Run the local upstreams a config points at, then the proxy, and stop them together.

`sim-stack` starts a simulator for every local upstream (its `model` is the profile);
`demo` starts a llama.cpp upstream for every local upstream (its `model` names a bundled
model). Ctrl-C or SIGTERM stops the proxy, then the upstream processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from urllib.parse import urlsplit

import httpx

from nudging_core.baselines import TOP_K

from .config import Config, ConfigError, UpstreamConfig

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
SIMULATOR_PROFILES = frozenset({"base", "aligned", "aligned-base"})
CLI = [sys.executable, "-m", "server.cli"]

# The command that serves one local upstream on a port.
Launcher = Callable[[int, UpstreamConfig], list[str]]


def local_upstreams(config: Config) -> dict[int, UpstreamConfig]:
    """Port -> upstream, for every upstream of the config on this machine."""
    upstreams: dict[int, UpstreamConfig] = {}
    for model in config.models:
        present = [u for u in (model.base, model.nudging, model.nudging_base) if u is not None]
        for upstream in present:
            for url in upstream.endpoints:
                parts = urlsplit(url)
                if parts.hostname not in LOCAL_HOSTS or parts.port is None:
                    continue
                known = upstreams.setdefault(parts.port, upstream)
                if known.model != upstream.model:
                    raise ConfigError(
                        f"port {parts.port} is given two models: {known.model}, {upstream.model}"
                    )
    return upstreams


def simulator_launcher(time_scale: float) -> Launcher:
    def launch(port: int, upstream: UpstreamConfig) -> list[str]:
        if upstream.model not in SIMULATOR_PROFILES:
            raise ConfigError(
                f"local upstream model {upstream.model!r} is not a simulator profile "
                f"({', '.join(sorted(SIMULATOR_PROFILES))})"
            )
        # Proxy tuning asks for the paper's top-100 logprobs, beyond vLLM's default of 20.
        return [*CLI, "simulate", "--host", "127.0.0.1", "--port", str(port), "--profile", upstream.model,
                "--time-scale", str(time_scale), "--max-logprobs", str(max(TOP_K.values()))]

    return launch


def local_launcher(threads: int | None) -> Launcher:
    """llama.cpp upstreams; by default the cores are shared out so the models do not
    oversubscribe the machine (on 2 cores: one thread each)."""

    def launch(port: int, upstream: UpstreamConfig) -> list[str]:
        share = threads or max(1, (os.cpu_count() or 2) // 2)
        return [*CLI, "local-upstream", "--host", "127.0.0.1", "--port", str(port), "--gguf", upstream.model,
                "--name", upstream.model, "--threads", str(share)]

    return launch


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_healthy(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the upstream on port {port} exited with code {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the upstream on port {port} did not become healthy")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def run_stack(
    config: Config, launch: Launcher, serve: Callable[[], None], *, startup_timeout: float = 60
) -> None:
    try:
        commands = {port: launch(port, upstream) for port, upstream in local_upstreams(config).items()}
    except ConfigError as error:
        sys.exit(f"nudging-proxy: {error}")
    # Another server on an upstream's port would answer /health in its place.
    busy = [port for port in commands if not _port_is_free(port)]
    if busy:
        ports = ", ".join(map(str, busy))
        sys.exit(f"nudging-proxy: port {ports} already in use; change the config's upstream URLs")
    processes: list[subprocess.Popen[bytes]] = []

    def terminate(signum: int, frame: FrameType | None) -> None:
        # Before the proxy runs, and after: uvicorn handles SIGTERM while it serves, then
        # raises it again once it has shut down, which lands here.
        _stop(processes)
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for command in commands.values():
            processes.append(subprocess.Popen(command))
        deadline = time.monotonic() + startup_timeout
        for port, process in zip(commands, processes, strict=True):
            _wait_healthy(port, process, deadline)
        print(f"upstreams ready on ports {', '.join(map(str, commands))}", flush=True)
        serve()
    except RuntimeError as error:
        sys.exit(f"nudging-proxy: {error}")
    finally:
        _stop(processes)
        signal.signal(signal.SIGTERM, previous)
