"""Run the local upstreams a config points at, then the proxy, and stop them together.

`sim-stack` starts a simulator for every local upstream (its `model` is the profile);
`demo` starts a llama.cpp upstream for every local upstream (its `model` names a bundled
model). Their output reaches this terminal, each line prefixed by the upstream's model name.
While the proxy serves, the upstreams are watched: one that exits is reported at once (its
exit status and last lines), requests that need it say so, and it is started again, up to
MAX_RESTARTS times; after that the whole stack stops with status 1. Ctrl-C or SIGTERM stops
the proxy, then the upstream processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from urllib.parse import urlsplit

import httpx

from nudging_core.config import Config, ConfigError, UpstreamConfig
from nudging_core.methods import MAX_TOP_K
from upstreams.exits import describe_exit

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
SIMULATOR_PROFILES = frozenset({"base", "aligned", "aligned-base"})
CLI = [sys.executable, "-m", "cli"]

MAX_RESTARTS = 3  # per upstream, while the proxy serves
LOG_TAIL_LINES = 20  # of an upstream's output, shown when it exits
WATCH_INTERVAL = 0.5  # seconds between looks at the upstream processes

# The command that serves one local upstream on a port.
Launcher = Callable[[int, UpstreamConfig], list[str]]
# Called with an upstream URL and why its process is down, or None when it is back.
DownReporter = Callable[[str, str | None], None]


def _local_endpoints(config: Config) -> Iterator[tuple[int, UpstreamConfig, str]]:
    """(port, upstream, URL) for every URL of the config on this machine."""
    for model in config.models:
        for upstream in (model.base, model.nudging, model.nudging_base):
            if upstream is None:
                continue
            for url in upstream.endpoints:
                parts = urlsplit(url)
                if parts.hostname in LOCAL_HOSTS and parts.port is not None:
                    yield parts.port, upstream, url


def local_upstreams(config: Config) -> dict[int, UpstreamConfig]:
    """Port -> upstream, for every upstream of the config on this machine."""
    upstreams: dict[int, UpstreamConfig] = {}
    for port, upstream, _url in _local_endpoints(config):
        known = upstreams.setdefault(port, upstream)
        if known.model != upstream.model:
            raise ConfigError(f"port {port} is given two models: {known.model}, {upstream.model}")
    return upstreams


def local_urls(config: Config, port: int) -> set[str]:
    """Every URL of the config that names the local upstream on `port`."""
    return {url for at, _upstream, url in _local_endpoints(config) if at == port}


def simulator_launcher(time_scale: float) -> Launcher:
    def launch(port: int, upstream: UpstreamConfig) -> list[str]:
        if upstream.model not in SIMULATOR_PROFILES:
            raise ConfigError(
                f"local upstream model {upstream.model!r} is not a simulator profile "
                f"({', '.join(sorted(SIMULATOR_PROFILES))})"
            )
        # Proxy tuning asks for the paper's top-100 logprobs, beyond vLLM's default of 20.
        return [*CLI, "simulate", "--host", "127.0.0.1", "--port", str(port), "--profile", upstream.model,
                "--time-scale", str(time_scale), "--max-logprobs", str(MAX_TOP_K)]

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


@dataclass
class UpstreamProcess:
    """One local upstream's process, its output relayed to this terminal with a prefix."""

    name: str
    port: int
    command: list[str]
    urls: set[str]
    restarts: int = 0
    process: subprocess.Popen[bytes] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    _relay: threading.Thread | None = None

    def start(self) -> None:
        self.tail.clear()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        self._relay = threading.Thread(target=self._copy_output, args=(self.process,),
                                       name=f"{self.name}-output", daemon=True)
        self._relay.start()

    def _copy_output(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(line)
            print(f"[{self.name}] {line}", flush=True)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def exit_report(self) -> str:
        """How the process ended and its last lines (read to the end of its output first)."""
        if self._relay is not None:
            self._relay.join(timeout=5)
        code = self.returncode
        ending = "is still running" if code is None else describe_exit(code)
        lines = "\n".join(f"  [{self.name}] {line}" for line in self.tail) or "  (no output)"
        return f"the upstream {self.name!r} on port {self.port} {ending}; its last lines:\n{lines}"

    def wait_healthy(self, deadline: float) -> None:
        process = self.process
        assert process is not None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(self.exit_report())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the upstream {self.name!r} on port {self.port} did not become healthy")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Supervisor:
    """Watches the upstreams while the proxy serves; restarts one that exits, or gives up."""

    def __init__(self, upstreams: list[UpstreamProcess], report_down: DownReporter,
                 startup_timeout: float, give_up: Callable[[], None]) -> None:
        self._upstreams = upstreams
        self._report_down = report_down
        self._startup_timeout = startup_timeout
        self._give_up = give_up
        self._stopping = threading.Event()
        # Held to start a process, and to stop supervising: no restart after the stack stops.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="upstream-supervisor", daemon=True)
        self.failed = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No restarts from now on; processes it started are the caller's to stop."""
        with self._lock:
            self._stopping.set()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL):
            for upstream in self._upstreams:
                code = upstream.returncode
                if code is not None and not self._stopping.is_set():
                    self._recover(upstream, code)
                    if self.failed:
                        return

    def _recover(self, upstream: UpstreamProcess, code: int) -> None:
        _say(upstream.exit_report())
        self._set_down(upstream, f"its local process {upstream.name!r} {describe_exit(code)}"
                                 + (", restarting it" if upstream.restarts < MAX_RESTARTS else ""))
        while upstream.restarts < MAX_RESTARTS:
            with self._lock:
                if self._stopping.is_set():
                    return
                upstream.restarts += 1
                _say(f"restarting {upstream.name!r} ({upstream.restarts} of {MAX_RESTARTS})")
                upstream.start()
            try:
                upstream.wait_healthy(time.monotonic() + self._startup_timeout)
            except RuntimeError as error:
                _say(str(error))
                continue
            self._set_down(upstream, None)
            _say(f"the upstream {upstream.name!r} is back on port {upstream.port}")
            return
        if self._stopping.is_set():
            return
        self._set_down(upstream, f"its local process {upstream.name!r} {describe_exit(code)} and "
                                 "was not restarted")
        _say(f"the upstream {upstream.name!r} failed {MAX_RESTARTS + 1} times; stopping")
        self.failed = True
        self._give_up()

    def _set_down(self, upstream: UpstreamProcess, problem: str | None) -> None:
        for url in upstream.urls:
            self._report_down(url, problem)


def _say(message: str) -> None:
    print(f"nudging-proxy: {message}", file=sys.stderr, flush=True)


def _stop_all(upstreams: list[UpstreamProcess]) -> None:
    for upstream in upstreams:
        upstream.stop()
    for upstream in upstreams:
        upstream.wait_stopped()


def run_stack(
    config: Config, launch: Launcher, serve: Callable[[], None], *,
    report_down: DownReporter = lambda url, problem: None, startup_timeout: float = 60,
) -> None:
    try:
        upstreams = [
            UpstreamProcess(upstream.model, port, launch(port, upstream), local_urls(config, port))
            for port, upstream in local_upstreams(config).items()
        ]
    except ConfigError as error:
        sys.exit(f"nudging-proxy: {error}")
    # Another server on an upstream's port would answer /health in its place.
    busy = [upstream.port for upstream in upstreams if not _port_is_free(upstream.port)]
    if busy:
        ports = ", ".join(map(str, busy))
        sys.exit(f"nudging-proxy: port {ports} already in use; change the config's upstream URLs")
    # SIGTERM to ourselves stops uvicorn gracefully, then lands in `terminate`.
    supervisor = Supervisor(upstreams, report_down, startup_timeout,
                            give_up=lambda: os.kill(os.getpid(), signal.SIGTERM))

    def terminate(signum: int, frame: FrameType | None) -> None:
        # Before the proxy runs, and after: uvicorn handles SIGTERM while it serves, then
        # raises it again once it has shut down, which lands here.
        supervisor.stop()
        _stop_all(upstreams)
        if supervisor.failed:
            sys.exit("nudging-proxy: stopped because an upstream kept failing")
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for upstream in upstreams:
            upstream.start()
        deadline = time.monotonic() + startup_timeout
        for upstream in upstreams:
            upstream.wait_healthy(deadline)
        print(f"upstreams ready on ports {', '.join(str(u.port) for u in upstreams)}", flush=True)
        supervisor.start()
        serve()
    except RuntimeError as error:
        sys.exit(f"nudging-proxy: {error}")
    finally:
        supervisor.stop()
        _stop_all(upstreams)
        signal.signal(signal.SIGTERM, previous)
    if supervisor.failed:
        sys.exit("nudging-proxy: stopped because an upstream kept failing")
