"""JSON logs and X-Request-Id: the id round-trips and reaches the upstreams; no secret or
upstream address appears in any response or log line, whether the request works or fails."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app
from server.logs import JsonFormatter, configure_logging

from .conftest import USER, scripted_pair
from .scripted import ScriptedUpstream
from .servers import free_port, running

CLIENT_KEY = "client-secret-key-7f3a"
UPSTREAM_KEY = "upstream-secret-key-91bc"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
CHAT = "/v1/chat/completions"


@dataclass
class Stack:
    proxy: str
    base: ScriptedUpstream
    nudger: ScriptedUpstream
    upstream_addresses: list[str]
    log: io.StringIO
    responses: list[httpx.Response] = field(default_factory=list)

    def upstream_headers(self) -> list[dict[str, str]]:
        return self.base.headers + self.nudger.headers

    def post(
        self, path: str, body: dict[str, Any], *, key: str = CLIENT_KEY, **headers: str
    ) -> httpx.Response:
        response = httpx.post(self.proxy + path, json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}", **headers})
        self.responses.append(response)
        return response

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@contextmanager
def restored_logging() -> Iterator[None]:
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.MonkeyPatch.context() as env, ExitStack() as stack:
        env.setenv("TEST_CLIENT_KEYS", CLIENT_KEY)
        env.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        pair = stack.enter_context(scripted_pair())
        base, nudger, base_url, nudger_url = pair.base, pair.nudger, pair.base_url, pair.nudger_url
        key = {"api_key_env": "TEST_UPSTREAM_KEY"}
        base_upstream = {"url": base_url + "/v1", "model": "base", **key}
        config = parse_config({"server": {"api_keys_env": "TEST_CLIENT_KEYS"}, "models": [
            {"name": "nudged", "base": base_upstream,
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "chatml", **key}},
            {"name": "base-only", "method": "base_only", "base": base_upstream},
            {"name": "dead", "method": "base_only",
             "base": {"url": f"http://{dead}/v1", "model": "m", **key}},
        ]})
        proxy = stack.enter_context(running(create_app(config)))
        stack.enter_context(restored_logging())
        log = io.StringIO()
        # No redaction here: the point is that nothing logs a secret in the first place.
        configure_logging("debug", secrets=(), stream=log)
        addresses = [base_url.removeprefix("http://"), nudger_url.removeprefix("http://"), dead]
        yield Stack(proxy, base, nudger, addresses, log)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "nudged", "messages": [{"role": "user", "content": USER}], **extra}


def access_line(stack: Stack, request_id: str) -> dict[str, Any]:
    # Written once the response has been sent, so possibly just after the client read it.
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in stack.log_lines() if line["logger"] == "nudging_proxy.access"
                 and line.get("request_id") == request_id]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(lines) == 1, stack.log.getvalue()
    return lines[0]


def test_a_given_request_id_round_trips_and_reaches_the_upstreams(stack: Stack) -> None:
    sent_before = len(stack.upstream_headers())
    response = stack.post(CHAT, chat(), **{"X-Request-Id": "client-id-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-id-1"
    # Each upstream request gets its own id (vLLM needs them unique), prefixed with the client's.
    forwarded = [headers["x-request-id"] for headers in stack.upstream_headers()[sent_before:]]
    assert len(forwarded) > 1 and len(set(forwarded)) == len(forwarded)
    assert all(re.fullmatch(r"client-id-1-[0-9a-f]{8}-\d+", upstream_id) for upstream_id in forwarded)
    line = access_line(stack, "client-id-1")
    assert line["level"] == "info" and line["status"] == 200 and line["model"] == "nudged"
    assert line["path"] == CHAT and line["duration_ms"] >= 0 and line["tokens"]["nudging"] > 0
    assert set(line) >= {"time", "message", "method", "first_text_ms"}


def test_concurrent_requests_with_one_client_id_send_distinct_upstream_ids(stack: Stack) -> None:
    # vLLM refuses a request id that is already running; clients that retry, or that send a
    # fixed id, must not make the proxy send one twice.
    sent_before = len(stack.upstream_headers())
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: stack.post(CHAT, chat(), **{"X-Request-Id": "same-id"}),
                                  range(2)))
    assert [r.status_code for r in responses] == [200, 200]
    forwarded = [headers["x-request-id"] for headers in stack.upstream_headers()[sent_before:]
                 if headers["x-request-id"].startswith("same-id-")]
    assert len(forwarded) > 2 and len(set(forwarded)) == len(forwarded)
    assert len({upstream_id.rsplit("-", 1)[0] for upstream_id in forwarded}) == 2


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 129, "<script>"])
def test_a_missing_or_malformed_request_id_is_replaced(stack: Stack, given: str | None) -> None:
    sent_before = len(stack.base.headers)
    headers = {} if given is None else {"X-Request-Id": given}
    with httpx.stream("POST", stack.proxy + CHAT, json=chat(stream=True), timeout=30,
                      headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers}) as response:
        response.read()
    stack.responses.append(response)
    request_id = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id)
    # A probe an earlier request cancelled as it ended may reach the upstream after that
    # request's answer; its id is that request's.
    earlier = {earlier.headers["x-request-id"] for earlier in stack.responses[:-1]}
    sent = {h["x-request-id"].rsplit("-", 2)[0] for h in stack.base.headers[sent_before:]}
    assert sent - earlier == {request_id}
    assert access_line(stack, request_id)["status"] == 200


def test_failures_are_logged_with_their_request_id(stack: Stack) -> None:
    cases = [
        (stack.post(CHAT, chat(), key="wrong-key"), 401, None),
        (stack.post(CHAT, chat(temperature=7)), 400, None),
        (stack.post(CHAT, chat(model="missing")), 404, None),
        (stack.post("/v1/completions", {"model": "base-only", "prompt": "unscripted"}), 502, "base-only"),
        (stack.post("/v1/completions", {"model": "dead", "prompt": "hi"}), 502, "dead"),
        (stack.post(CHAT, chat(model="dead", stream=True)), 502, "dead"),
    ]
    for response, status, model in cases:
        assert response.status_code == status, response.text
        line = access_line(stack, response.headers["x-request-id"])
        assert line["status"] == status and line.get("model") == model


def test_no_secret_or_upstream_address_in_responses_or_logs(stack: Stack) -> None:
    # After the tests above, so their requests (ok, invalid, unauthorized, upstream down) count.
    assert len(stack.responses) >= 10
    secrets = [CLIENT_KEY, UPSTREAM_KEY, *stack.upstream_addresses]
    texts = [stack.log.getvalue()] + [r.text + json.dumps(dict(r.headers)) for r in stack.responses]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert all(isinstance(line, dict) for line in stack.log_lines())


def test_the_formatter_redacts_configured_secrets() -> None:
    formatter = JsonFormatter(secrets=["10.0.0.5:8000", "sk-live"])
    arguments = ("10.0.0.5:8000", "sk-live")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "calling %s with %s", arguments, None)
    line = json.loads(formatter.format(record))
    assert line["message"] == "calling <redacted> with <redacted>"
    assert line["level"] == "warning" and "request_id" not in line
