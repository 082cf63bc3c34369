"""`GET /metrics` after requests on the scripted pair: each counter moves by what happened."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nudging_core.config import parse_config
from server.app import create_app
from upstreams.simulator.app import create_app as create_simulator

from .conftest import BASE_PROMPT, USER
from .servers import running

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: str) -> Samples:
    """The metrics once no request is in flight: a request is recorded as its response ends,
    which can be just after the client has read the last byte."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(proxy + "/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }
        busy = sum(value for (name, labels), value in samples.items()
                   if name == "nudging_proxy_requests_in_flight" and ("endpoint", "/metrics") not in labels)
        if not busy or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def chat(**extra: Any) -> dict[str, Any]:
    # `paper` sends its upstream requests one at a time and never cancels one.
    return {"model": "nudged", "messages": [{"role": "user", "content": USER}],
            "nudging": {"return_provenance": True, "strategy": "paper"}, **extra}


def test_a_nudged_answer(proxy: str) -> None:
    httpx.post(proxy + CHAT, json=chat(), timeout=30).raise_for_status()  # the dialects are known now
    before = scrape(proxy)
    response = httpx.post(proxy + CHAT, json=chat(), timeout=30)
    after = scrape(proxy)
    assert response.status_code == 200
    report = response.json()["choices"][0]["nudging"]
    m = "nudging_proxy_"
    assert moved(before, after, m + "requests_total", model="nudged", endpoint=CHAT, status="200") == 1
    assert moved(before, after, m + "request_duration_seconds_count", model="nudged", endpoint=CHAT) == 1
    assert moved(before, after, m + "time_to_first_token_seconds_count", model="nudged", endpoint=CHAT) == 1
    assert moved(before, after, m + "errors_total", model="nudged", endpoint=CHAT, status="200") == 0
    for source in ("base", "nudging"):
        assert moved(before, after, m + "completion_tokens_total", model="nudged", source=source) == \
            report["tokens"][source]
    total = report["tokens"]["base"] + report["tokens"]["nudging"]
    assert moved(before, after, m + "nudging_token_ratio_count", model="nudged") == 1
    assert moved(before, after, m + "nudging_token_ratio_sum", model="nudged") == \
        report["tokens"]["nudging"] / total
    # Every completion of the generation, plus the base prompt's /tokenize.
    sent = {role: sum(moved(before, after, m + "upstream_requests_total", role=role, outcome=outcome)
                      for outcome in ("200", "500", "timeout", "unreachable", "cancelled"))
            for role in ("base", "nudging")}
    assert sent == {"base": report["upstream_requests"]["base"] + 1,
                    "nudging": report["upstream_requests"]["nudging"]}
    latencies = moved(before, after, m + "upstream_response_seconds_count", role="base", outcome="200")
    assert latencies == sent["base"]
    assert after[(m + "requests_in_flight", frozenset({("endpoint", CHAT)}))] == 0


def test_a_stream_and_a_passthrough(proxy: str) -> None:
    before = scrape(proxy)
    with httpx.stream("POST", proxy + CHAT, json=chat(stream=True), timeout=30) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    assert [line for line in lines if line][-1] == "data: [DONE]"
    passthrough = httpx.post(proxy + "/v1/completions", timeout=30,
                             json={"model": "base-only", "prompt": BASE_PROMPT, "max_tokens": 2})
    after = scrape(proxy)
    assert passthrough.status_code == 200
    m = "nudging_proxy_"
    assert moved(before, after, m + "time_to_first_token_seconds_count", model="nudged", endpoint=CHAT) == 1
    assert moved(before, after, m + "requests_total", model="base-only", endpoint="/v1/completions",
                 status="200") == 1
    assert moved(before, after, m + "completion_tokens_total", model="base-only", source="base") == 2
    # Passthrough answers have no nudging ratio.
    assert moved(before, after, m + "nudging_token_ratio_count", model="base-only") == 0


def test_errors_by_status(proxy: str) -> None:
    before = scrape(proxy)
    unknown = httpx.post(proxy + CHAT, json={**chat(), "model": "nope"})
    invalid = httpx.post(proxy + CHAT, json=chat(temperature=9))
    unscripted = httpx.post(proxy + "/v1/completions", json={"model": "base-only", "prompt": "unscripted"})
    after = scrape(proxy)
    assert (unknown.status_code, invalid.status_code, unscripted.status_code) == (404, 400, 502)
    m = "nudging_proxy_"
    # A request that names no configured model is counted without one, so clients cannot grow the labels.
    assert moved(before, after, m + "requests_total", model="", endpoint=CHAT, status="404") == 1
    assert moved(before, after, m + "errors_total", model="", endpoint=CHAT, status="404") == 1
    assert moved(before, after, m + "errors_total", model="", endpoint=CHAT, status="400") == 1
    assert moved(before, after, m + "errors_total", model="base-only", endpoint="/v1/completions",
                 status="502") == 1
    # At least once: a failure before any text reached the client may be retried.
    assert moved(before, after, m + "upstream_requests_total", role="base", outcome="500") >= 1
    httpx.get(proxy + "/no/such/path")
    assert moved(after, scrape(proxy), m + "requests_total", model="", endpoint="other", status="404") == 1


def test_an_upstream_cut_mid_stream_counts_as_a_stream_error() -> None:
    # The base upstream closes every stream after 4 events: text has reached the client by
    # then, so the proxy ends the stream with an error event instead of retrying.
    with running(create_simulator("base", time_scale=0, faults="kind=stream:stream_cut=4")) as base:
        config = parse_config({"models": [
            {"name": "base", "method": "base_only", "base": {"url": base + "/v1", "model": "base"}}]})
        with running(create_app(config)) as proxy:
            body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 50, "stream": True}
            with httpx.stream("POST", proxy + "/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-2].startswith('data: {"error"') and lines[-1] == "data: [DONE]"
            samples = scrape(proxy)
    m, endpoint = "nudging_proxy_", "/v1/completions"
    assert moved({}, samples, m + "errors_total", model="base", endpoint=endpoint, status="stream") == 1
    assert moved({}, samples, m + "requests_total", model="base", endpoint=endpoint, status="200") == 1
