"""`nudging-proxy serve`: uvicorn in this process, or in `server.workers` worker processes.

The proxy keeps no state between requests, so workers need nothing shared but the listening
socket (uvicorn's) and the metrics (prometheus-client's multiprocess mode, in a directory made
here for the workers and removed when they have all ended)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from nudging_core.config import Config
from server.app import create_app
from server.connections import http_protocol, uvicorn_options
from server.logs import configure_logging, secrets_of
from server.metrics import MULTIPROCESS_ENV, forget_process


def exit_after_shutdown(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM and SIGINT handler while serving. uvicorn raises the signal again once it
    has shut down; exiting then (cleanly: 0) still lets the requests it cancelled end, as
    server/shutdown.py ends them, where the default handler would kill the process first."""
    sys.exit(0)


class ProxyServerConfig(uvicorn.Config):
    """uvicorn's settings for the proxy. With workers, uvicorn pickles these to each worker
    process, which then builds its own app and HTTP protocol from the proxy's config (neither
    can be pickled) and sets up its own logging."""

    def __init__(self, config: Config, host: str, port: int, workers: int, app: FastAPI | None) -> None:
        self.proxy_config = config
        self.prebuilt_app = app
        options: dict[str, Any] = {**uvicorn_options(config.server), "http": "auto"}
        super().__init__(
            app="", host=host, port=port, workers=workers,
            log_config=None,
            access_log=False,  # ours carries the request id, model and tokens (server/observability.py)
            timeout_graceful_shutdown=config.server.shutdown_grace_seconds,
            **options,
        )

    def configure_logging(self) -> None:
        configure_logging(self.proxy_config.server.log_level, secrets_of(self.proxy_config))
        if multiprocessing.parent_process() is not None:
            # A worker, where uvicorn calls this first: the worker handles its signals as
            # `nudging-proxy serve` does in a single process.
            signal.signal(signal.SIGTERM, exit_after_shutdown)
            signal.signal(signal.SIGINT, exit_after_shutdown)

    def load(self) -> None:
        self.http = http_protocol(self.proxy_config.server)
        super().load()

    def load_app(self) -> Any:
        return self.prebuilt_app or create_app(self.proxy_config)


class Workers(Multiprocess):
    """uvicorn's worker supervisor, which also drops the in-flight gauges of a worker that
    died (it never counted its requests out of flight) when it starts the worker's successor."""

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {process.pid for process in self.processes}:
            if pid is not None:
                forget_process(pid)


def serve(config: Config, host: str | None, port: int | None, workers: int | None = None,
          app: FastAPI | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; then stop accepting, let running requests finish for up
    to `shutdown_grace_seconds`, and end the rest (server/shutdown.py). With more than one
    worker (`workers`, else `server.workers`), SIGTERM goes on to each worker. `app`, built
    already, is served from this process."""
    workers = 1 if app is not None else workers or config.server.workers
    settings = ProxyServerConfig(config, host or config.server.host, port or config.server.port,
                                 workers, app)
    if workers == 1:
        server = uvicorn.Server(settings)
        server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
        return
    with tempfile.TemporaryDirectory(prefix="nudging-proxy-metrics-") as directory:
        # Read by prometheus-client as each worker imports it.
        os.environ[MULTIPROCESS_ENV] = directory
        Workers(settings, sockets=[settings.bind_socket()]).run()
