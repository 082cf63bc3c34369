"""Admission control per model (`max_concurrent`, `max_queued`, `queue_timeout_seconds`): past
the queue, or past the wait, a 429 with Retry-After and no upstream request. A stream whose
first event is slow opens at once (headers and an SSE comment); a failure after that is an
error event and `[DONE]`. Over real sockets, on the simulator."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator
from upstreams.simulator.latency import LatencyModel

from .servers import running
from .test_no_upstream_work import Counted

HOLD_SECONDS = 3.0
QUEUE_TIMEOUT_SECONDS = 1.0
OPEN_SECONDS = 0.2


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with running(create_simulator("base", time_scale=0)) as url:
        yield url


def _proxy(upstream: str, timeouts: dict[str, float] | None = None, **model: Any) -> Any:
    base = {"url": upstream + "/v1", "model": "base", "dialect": "vllm", "timeouts": timeouts or {}}
    config = {"server": {"stream_open_seconds": OPEN_SECONDS},
              "models": [{"name": "gated", "method": "base_only", "base": base, "retries": 0, **model}]}
    return running(create_proxy(parse_config(config)))


def _set_faults(upstream: str, spec: str) -> None:
    assert httpx.post(upstream + "/faults", json={"faults": spec}).status_code == 200


def _upstream_requests(upstream: str) -> int:
    total: int = httpx.get(upstream + "/stats").json()["requests_total"]
    return total


def _ask(proxy: str, results: list[httpx.Response] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "gated", "prompt": "Once upon a time", "max_tokens": 4, **extra}
    response = httpx.post(proxy + "/v1/completions", json=body, timeout=30)
    if results is not None:
        results.append(response)
    return response


def _in_background(proxy: str, results: list[httpx.Response]) -> threading.Thread:
    thread = threading.Thread(target=_ask, args=(proxy, results))
    thread.start()
    return thread


def _assert_rate_limited(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "1"
    error: dict[str, Any] = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert "gated" in error["message"]
    return error


def _metric(proxy: str, name: str) -> float:
    for line in httpx.get(proxy + "/metrics").text.splitlines():
        if line.startswith(f'nudging_proxy_{name}{{model="gated"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_request_past_a_full_queue_is_a_429_before_any_upstream_request(upstream: str) -> None:
    with _proxy(upstream, max_concurrent=1, max_queued=1, queue_timeout_seconds=30) as proxy:
        _set_faults(upstream, f"delay={HOLD_SECONDS}*1")  # the running request holds its place
        results: list[httpx.Response] = []
        try:
            running_one = _in_background(proxy, results)
            time.sleep(0.5)
            queued_one = _in_background(proxy, results)
            time.sleep(0.5)
            before = _upstream_requests(upstream)
            assert _metric(proxy, "admission_queued") == 1
            started = time.monotonic()
            rejected = _ask(proxy)
            waited = time.monotonic() - started
            after = _upstream_requests(upstream)
        finally:
            running_one.join()
            queued_one.join()
            _set_faults(upstream, "")
        error = _assert_rate_limited(rejected)
        assert "running" in error["message"]
        assert waited < 5, waited  # turned away at once, not queued for its 30 s
        assert after == before
        # The running and the queued request were both answered; the places are free again.
        assert [response.status_code for response in results] == [200, 200]
        assert _ask(proxy).status_code == 200
        assert _metric(proxy, "admission_rejected_total") == 1
        assert _metric(proxy, "admission_queued") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_waits_past_the_queue_timeout_is_a_429(upstream: str, stream: bool) -> None:
    with _proxy(upstream, max_concurrent=1, max_queued=4,
                queue_timeout_seconds=QUEUE_TIMEOUT_SECONDS) as proxy:
        _set_faults(upstream, f"delay={HOLD_SECONDS}*1")
        results: list[httpx.Response] = []
        try:
            running_one = _in_background(proxy, results)
            time.sleep(0.5)
            before = _upstream_requests(upstream)
            started = time.monotonic()
            rejected = _ask(proxy, stream=stream)
            waited = time.monotonic() - started
            after = _upstream_requests(upstream)
        finally:
            running_one.join()
            _set_faults(upstream, "")
        error = _assert_rate_limited(rejected)
        assert f"{QUEUE_TIMEOUT_SECONDS:g} s" in error["message"]
        assert QUEUE_TIMEOUT_SECONDS <= waited < QUEUE_TIMEOUT_SECONDS + 5, waited
        assert after == before
        assert results[0].status_code == 200


def test_a_queued_client_that_leaves_gives_its_place_back(upstream: str) -> None:
    with _proxy(upstream, max_concurrent=1, max_queued=1, queue_timeout_seconds=30) as proxy:
        _set_faults(upstream, f"delay={HOLD_SECONDS}*1")
        results: list[httpx.Response] = []
        try:
            running_one = _in_background(proxy, results)
            time.sleep(0.5)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(proxy + "/v1/completions", json={"model": "gated", "prompt": "x", "max_tokens": 2},
                           timeout=0.5)
            time.sleep(0.2)
            queued = _in_background(proxy, results)  # takes the place the leaver gave back
        finally:
            running_one.join()
            queued.join()
            _set_faults(upstream, "")
        assert [response.status_code for response in results] == [200, 200]


def test_a_slow_stream_opens_with_a_comment_before_its_first_event(upstream: str) -> None:
    _set_faults(upstream, f"kind=stream:delay={HOLD_SECONDS}*1")
    body = {"model": "gated", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    try:
        with _proxy(upstream) as proxy:
            started = time.monotonic()
            with httpx.stream("POST", proxy + "/v1/completions", json=body, timeout=30) as streamed:
                opened = time.monotonic() - started
                lines = streamed.iter_lines()
                first = next(lines)
                commented = time.monotonic() - started
                rest = [line for line in lines if line]
    finally:
        _set_faults(upstream, "")
    assert streamed.status_code == 200
    assert opened < HOLD_SECONDS - 1 and commented < HOLD_SECONDS - 1, (opened, commented)
    assert first == ": ok"
    assert rest[-1] == "data: [DONE]" and any(line.startswith('data: {"id"') for line in rest)


def test_a_failure_after_the_stream_opened_is_an_error_event_and_done(upstream: str) -> None:
    # The upstream sends its headers, then nothing: the proxy's read timeout ends it.
    _set_faults(upstream, "kind=stream:stall=0*1")
    body = {"model": "gated", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    try:
        with _proxy(upstream, timeouts={"read": 1}) as proxy:
            with httpx.stream("POST", proxy + "/v1/completions", json=body, timeout=30) as streamed:
                lines = [line for line in streamed.iter_lines() if line]
            metrics = httpx.get(proxy + "/metrics").text
    finally:
        _set_faults(upstream, "")
    assert streamed.status_code == 200
    assert lines[0] == ": ok"
    assert lines[1].startswith('data: {"error"') and '"upstream_timeout"' in lines[1]
    assert lines[-1] == "data: [DONE]" and len(lines) == 3
    assert 'errors_total{endpoint="/v1/completions",model="gated",status="stream"} 1.0' in metrics


def test_a_chat_passthrough_request_takes_its_place_too() -> None:
    # The aligned simulator's own chat endpoint, slowed so the first request holds its place.
    slow = LatencyModel(request_ms=HOLD_SECONDS * 1000, prefill_ms=0.0, decode_ms=1)
    with running(create_simulator("aligned", time_scale=1.0, latency=slow)) as upstream:
        nudging = {"url": upstream + "/v1", "model": "aligned", "chat_template": "chatml"}
        config = {"models": [{"name": "gated", "method": "nudging_only", "passthrough": "chat",
                              "nudging": nudging, "max_concurrent": 1, "max_queued": 0}]}
        body = {"model": "gated", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with running(create_proxy(parse_config(config))) as proxy:
            results: list[httpx.Response] = []

            def ask() -> None:
                results.append(httpx.post(proxy + "/v1/chat/completions", json=body, timeout=30))

            first = threading.Thread(target=ask)
            first.start()
            time.sleep(0.5)
            before = _upstream_requests(upstream)
            rejected = httpx.post(proxy + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
            after = _upstream_requests(upstream)
            first.join()
            _assert_rate_limited(rejected)
            assert after == before
            assert [response.status_code for response in results] == [200]
            assert results[0].json()["choices"][0]["message"]["content"]


def test_a_turned_away_request_renders_nothing_upstream() -> None:
    # Token-id prompts of a nudged model are read with the base's /detokenize: after admission.
    slow = LatencyModel(request_ms=HOLD_SECONDS * 1000, prefill_ms=0.0, decode_ms=1)
    base = Counted(create_simulator("base", time_scale=1.0, latency=slow))
    with running(base) as base_url, running(create_simulator("aligned", time_scale=0)) as aligned_url:
        config = {"models": [{
            "name": "gated", "max_concurrent": 1, "max_queued": 0,
            "base": {"url": base_url + "/v1", "model": "base"},
            "nudging": {"url": aligned_url + "/v1", "model": "aligned", "chat_template": "chatml"}}]}
        with running(create_proxy(parse_config(config))) as proxy:
            ids = httpx.post(base_url + "/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
            results: list[httpx.Response] = []
            first = _in_background(proxy, results)
            time.sleep(0.5)
            base.paths.clear()
            rejected = _ask(proxy, prompt=ids)
            seen = list(base.paths)
            first.join()
    _assert_rate_limited(rejected)
    assert seen == []
    assert [response.status_code for response in results] == [200]
