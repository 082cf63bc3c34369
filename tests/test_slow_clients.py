"""Clients that hold upstream slots: a request that cannot get a slot within the upstream's
`pool` timeout is a 503 with Retry-After, and a streamed answer nobody reads is dropped after
`server.send_timeout_seconds`, giving its slot back. Over real sockets, on the simulator."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

POOL_SECONDS = 1.0
SEND_TIMEOUT_SECONDS = 1.0
# Far more than the socket buffers hold (Linux lets a send buffer grow to 4 MiB): with 20
# logprobs an event is about 2 kB.
LONG_ANSWER_TOKENS = 50_000


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with running(create_simulator("base", time_scale=0, max_model_len=2 * LONG_ANSWER_TOKENS)) as url:
        yield url


def _proxy_config(upstream: str, pool: float) -> dict[str, object]:
    base = {"url": upstream + "/v1", "model": "base", "dialect": "vllm", "max_in_flight": 1,
            "timeouts": {"pool": pool}}
    # A stream opens only after its slot wait failed or not, so that failure is still an HTTP error.
    server = {"send_timeout_seconds": SEND_TIMEOUT_SECONDS, "stream_open_seconds": pool + 5}
    return {"server": server,
            "models": [{"name": "one-slot", "method": "base_only", "base": base,
                        "max_tokens_limit": LONG_ANSWER_TOKENS}]}


def _set_faults(upstream: str, spec: str) -> None:
    response = httpx.post(upstream + "/faults", json={"faults": spec})
    assert response.status_code == 200, response.text


def _stats(upstream: str) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(upstream + "/stats").json()
    return stats


def _ask(proxy: str, *, stream: bool = False, timeout: float = 60) -> httpx.Response:
    body = {"model": "one-slot", "prompt": "Once upon a time", "max_tokens": 4, "stream": stream}
    return httpx.post(proxy + "/v1/completions", json=body, timeout=timeout)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_gets_no_slot_within_pool_is_a_503_with_retry_after(
    upstream: str, stream: bool
) -> None:
    with running(create_proxy(parse_config(_proxy_config(upstream, POOL_SECONDS)))) as proxy:
        # The first request holds the only slot for 8 s (its answer's headers are that late).
        _set_faults(upstream, "kind=stream|non-stream:delay=8*1")
        holder = threading.Thread(target=_ask, args=(proxy,))
        holder.start()
        try:
            time.sleep(0.5)
            started = time.monotonic()
            response = _ask(proxy, stream=stream)
            waited = time.monotonic() - started
        finally:
            holder.join()
            _set_faults(upstream, "")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_unavailable")
    assert "slots" in error["message"]
    assert POOL_SECONDS <= waited < POOL_SECONDS + 5, waited


def _open_unread_stream(proxy: str) -> socket.socket:
    """A client that asks for a long streamed answer and never reads it."""
    host, port = proxy.removeprefix("http://").split(":")
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    client.connect((host, int(port)))
    body = json.dumps({"model": "one-slot", "prompt": "Once upon a time", "max_tokens": LONG_ANSWER_TOKENS,
                       "stream": True, "ignore_eos": True, "logprobs": 20}).encode()
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return client


def test_a_stream_nobody_reads_is_dropped_and_frees_its_upstream_slot(upstream: str) -> None:
    # Without a send timeout the second request would wait its whole (long) pool timeout.
    cancelled_before = _stats(upstream)["requests_cancelled"]
    with running(create_proxy(parse_config(_proxy_config(upstream, pool=60)))) as proxy:
        client = _open_unread_stream(proxy)
        try:
            time.sleep(1)  # the stream has started and filled the socket's buffers
            started = time.monotonic()
            response = _ask(proxy, timeout=90)
            waited = time.monotonic() - started
        finally:
            client.close()
    assert response.status_code == 200, response.text
    # Filling the buffers takes a few seconds on a busy machine; the pool's 60 s is far off.
    assert waited < SEND_TIMEOUT_SECONDS + 30, waited
    # The long answer's upstream request was cancelled, not left to finish.
    assert _stats(upstream)["requests_cancelled"] == cancelled_before + 1
