"""The HTTP connection as an attacker sees it: framing, duplicate credentials, slow clients and
too many connections, with the proxy served by uvicorn as `nudging-proxy serve` does."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml

from nudging_core.config import ConfigError, parse_config
from server.app import create_app
from server.connections import uvicorn_options

from .servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent

# Nothing listens on port 9: these tests never reach an upstream.
MODELS = [{"name": "a", "method": "base_only", "base": {"url": "http://127.0.0.1:9/v1", "model": "m"}}]


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> str:
    """Both of uvicorn's HTTP parsers: httptools, the default, and h11."""
    return str(request.param)


@contextmanager
def proxy(parser: str, **server: Any) -> Iterator[str]:
    settings: dict[str, Any] = {"http": parser, **server}
    config = parse_config({"server": settings, "models": MODELS})
    with running(create_app(config), options=uvicorn_options(config.server)) as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _seconds_until_closed(sock: socket.socket) -> float:
    started = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def test_content_length_with_transfer_encoding_is_a_400(parser: str) -> None:
    with proxy(parser) as url, _connect(url) as sock:
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")


def test_two_authorization_headers_are_refused(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "good")
    with proxy(parser, api_keys_env="TEST_KEYS") as url:
        headers = [("Authorization", "Bearer bad"), ("Authorization", "Bearer good")]
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
        assert httpx.get(url + "/v1/models", headers=headers[::-1]).status_code == 401
        assert httpx.get(url + "/v1/models", headers=headers[1:]).status_code == 200


@pytest.mark.parametrize("partial", [b"POST /v1/chat/comp", b"POST /v1/models HTTP/1.1\r\nHost: x\r\n"])
def test_a_partial_request_is_closed_at_the_header_deadline(parser: str, partial: bytes) -> None:
    with proxy(parser, header_timeout_seconds=1) as url, _connect(url) as sock:
        sock.sendall(partial)
        assert 0.8 < _seconds_until_closed(sock) < 2.5


def test_the_header_deadline_restarts_for_each_request_on_a_connection(parser: str) -> None:
    with (proxy(parser, header_timeout_seconds=1, keep_alive_seconds=5) as url,
          httpx.Client(base_url=url) as client):
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.6)
        sock = _connect(url)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /hea")  # the second request's deadline counts from the first's end
        assert 0.8 < _seconds_until_closed(sock) < 2.5


def test_a_partial_body_is_closed_at_the_body_deadline(parser: str) -> None:
    # The head is complete and in time; the body stops halfway.
    with proxy(parser, header_timeout_seconds=5, body_timeout_seconds=1) as url, _connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": \"a\",")
        assert 0.8 < _seconds_until_closed(sock) < 2.5


def test_the_body_deadline_spares_a_body_that_arrives_in_time(parser: str) -> None:
    with proxy(parser, body_timeout_seconds=2, keep_alive_seconds=10) as url, _connect(url) as sock:
        body = b'{"model": "nope", "prompt": "x"}'
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        assert sock.recv(4096).startswith(b"HTTP/1.1 404 ")  # the unknown model: the body was read
        time.sleep(2)  # past the first request's body deadline, the connection is still open
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_connections_over_the_cap_get_a_503(parser: str) -> None:
    with proxy(parser, max_connections=2) as url:
        assert httpx.get(url + "/health").status_code == 200
        with _connect(url):
            time.sleep(0.2)  # accepted, so counted
            refused = httpx.get(url + "/health")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert refused.json() == {"error": {
        "message": "The server is at its connection limit (max_connections); retry later.",
        "type": "server_error", "param": None, "code": "server_overloaded"}}


@pytest.mark.parametrize("setting", [{"header_timeout_seconds": 0}, {"body_timeout_seconds": 0},
                                     {"keep_alive_seconds": 0},
                                     {"max_connections": 0}, {"header_timeout_seconds": -1}])
def test_connection_settings_are_checked_at_start_up(setting: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(setting))):
        parse_config({"server": setting, "models": MODELS})


def _serve_with_few_descriptors(config_path: Path, descriptors: int,
                                log: IO[bytes]) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    return subprocess.Popen([sys.executable, "-m", "cli", "serve", "--config", str(config_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log, preexec_fn=limit)


def test_accept_errors_are_logged_once_per_interval_with_a_count(tmp_path: Path) -> None:
    # asyncio's loop, whose accept() errors these are (uvloop's libuv sheds them silently).
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port, "loop": "asyncio", "http": "h11"},
              "models": MODELS}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "proxy.log"  # a file: a pipe left unread would block the proxy's logging
    with log_path.open("wb") as log:
        process = _serve_with_few_descriptors(path, 64, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        flood = [_connect(url) for _ in range(100)]  # beyond the proxy's 64 descriptors
        time.sleep(3)  # asyncio retries accepting every second
        for sock in flood:
            sock.close()
        time.sleep(1.5)
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # it recovered
    finally:
        process.terminate()
        process.wait(timeout=30)
    logged = log_path.read_text()
    lines = [line for line in logged.splitlines() if "out of system resource" in line]
    assert 1 <= len(lines) <= 2, len(lines)
    assert "Too many open files" in lines[0] and "Traceback" not in logged
