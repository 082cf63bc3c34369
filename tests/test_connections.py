"""The HTTP connection as an attacker sees it: framing, duplicate credentials, slow clients and
too many connections, with the proxy served by uvicorn as `nudging-proxy serve` does."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from nudging_core.config import ConfigError, parse_config
from server.app import create_app
from server.connections import uvicorn_options

from .servers import running

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


def test_connections_over_the_cap_get_a_503(parser: str) -> None:
    with proxy(parser, max_connections=2) as url:
        assert httpx.get(url + "/health").status_code == 200
        with _connect(url):
            time.sleep(0.2)  # accepted, so counted
            assert httpx.get(url + "/health").status_code == 503


@pytest.mark.parametrize("setting", [{"header_timeout_seconds": 0}, {"keep_alive_seconds": 0},
                                     {"max_connections": 0}, {"header_timeout_seconds": -1}])
def test_connection_settings_are_checked_at_start_up(setting: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(setting))):
        parse_config({"server": setting, "models": MODELS})
