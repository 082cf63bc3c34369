"""Run ASGI apps on real sockets for tests: uvicorn in a background thread, or a real
`nudging-proxy serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(app: ASGIApp, port: int | None = None, options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 and yield its base URL; shut it down afterwards. `options` are
    more uvicorn settings (the proxy's: `server.connections.uvicorn_options`)."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **(options or {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_process(
    tmp_path: Path, simulator: str, grace: int = 30, workers: int = 1, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`nudging-proxy serve --workers N` in a process of its own, passing `base_only` requests
    to the simulator at `simulator`, once it answers /health; killed afterwards if still running."""
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": grace},
              "models": [{"name": "base", "method": "base_only", "max_tokens_limit": 4000,
                          "base": {"url": simulator + "/v1", "model": "base"}}]}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "cli", "serve", "--config", str(path), "--workers", str(workers)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the proxy exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
