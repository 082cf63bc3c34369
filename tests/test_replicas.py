"""Several replicas per role: spreading, cool-down after a failure, failover of generations."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from cli.stack import local_upstreams
from nudging_core.config import ConfigError, parse_config
from nudging_core.upstream import ReplicaHealth, ReplicaSet, UpstreamClient
from server.app import create_app
from upstreams.simulator.app import create_app as create_simulator

from .servers import free_port, running


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replica_set(count: int, clock: Clock, cooldown: float = 5.0) -> ReplicaSet:
    clients = [UpstreamClient(f"http://replica-{i}/v1", "m", role="base") for i in range(count)]
    return ReplicaSet(clients, [ReplicaHealth(cooldown, clock) for _ in clients])


def picked(replicas: ReplicaSet, times: int) -> list[int]:
    return [replicas.clients.index(replicas.pick()) for _ in range(times)]


def test_generations_spread_round_robin() -> None:
    assert picked(replica_set(3, Clock()), 6) == [0, 1, 2, 0, 1, 2]


def test_a_failed_replica_is_skipped_until_its_cooldown_ends() -> None:
    clock = Clock()
    replicas = replica_set(2, clock, cooldown=5.0)
    replicas.healths[0].failed()
    assert picked(replicas, 4) == [1, 1, 1, 1]
    clock.now += 5.0
    assert sorted(picked(replicas, 2)) == [0, 1]


def test_when_every_replica_cools_down_the_first_to_recover_is_tried() -> None:
    clock = Clock()
    replicas = replica_set(3, clock, cooldown=5.0)
    replicas.healths[2].failed()
    clock.now += 1
    replicas.healths[0].failed()
    clock.now += 1
    replicas.healths[1].failed()
    assert picked(replicas, 2) == [2, 2]


def test_a_success_ends_the_cooldown() -> None:
    clock = Clock()
    health = ReplicaHealth(5.0, clock)
    health.failed()
    assert not health.available
    health.succeeded()
    assert health.available and health.failures == 1


def upstream(**address: object) -> dict[str, object]:
    return {"models": [{"name": "m", "method": "base_only", "base": {"model": "b", **address}}]}


@pytest.mark.parametrize(("address", "message"), [
    ({}, "give either `url` (one server) or `urls` (replicas)"),
    ({"url": "http://a/v1", "urls": ["http://b/v1"]}, "give either `url` (one server) or `urls` (replicas)"),
    ({"urls": []}, "models.0.base.urls"),
    ({"urls": ["http://a/v1", "http://a/v1"]}, "lists the same URL twice"),
    ({"urls": ["http://a/v1", "ftp://b"]}, "must start with http:// or https://"),
])
def test_replica_addresses_are_validated(address: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="models.0.base") as caught:
        parse_config(upstream(**address))
    assert message in str(caught.value)


def test_a_replica_that_sends_no_headers_in_time_cools_down() -> None:
    with running(create_simulator("base", time_scale=0, faults="kind=stream:delay=5")) as url:
        config = parse_config({"models": [{
            "name": "base", "method": "base_only", "retries": 0,
            "base": {"urls": [url + "/v1"], "model": "base", "timeouts": {"first_byte": 0.3}},
        }]})
        app = create_app(config)
        with running(app) as proxy:
            body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
            response = httpx.post(proxy + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 504, response.text
            health = app.state.registry.get("base").replicas["base"].healths[0]
            assert health.failures == 1 and not health.available


def test_the_stack_commands_start_every_local_replica() -> None:
    config = parse_config({"models": [{
        "name": "m", "method": "base_only",
        "base": {"urls": ["http://127.0.0.1:8101/v1", "http://localhost:8102/v1", "http://gpu-box:8000/v1"],
                 "model": "base"},
    }]})
    assert {port: upstream.model for port, upstream in local_upstreams(config).items()} == {
        8101: "base", 8102: "base"}


# --- failover against real simulator processes --------------------------------------------------


class Simulator:
    """A simulator in its own process, so that it can be killed like a crashed server."""

    def __init__(self, profile: str, port: int, time_scale: float) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._command = [sys.executable, "-m", "upstreams.simulator", "--profile", profile,
                         "--port", str(port), "--time-scale", str(time_scale), "--log-level", "warning"]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(self._command)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("simulator did not start")

    def kill(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def served(self) -> int:
        return int(httpx.get(self.url + "/stats", timeout=5).json()["requests_total"])


@contextmanager
def simulators() -> Iterator[tuple[Simulator, Simulator, Simulator]]:
    # Slowed down so that streams are still running when a replica is killed.
    pair = (Simulator("base", free_port(), 3.0), Simulator("base", free_port(), 3.0),
            Simulator("aligned", free_port(), 1.0))
    try:
        for simulator in pair:
            simulator.start()
        yield pair
    finally:
        for simulator in pair:
            simulator.stop()


def registry_health(app: FastAPI) -> ReplicaHealth:
    """The first base replica's health, as the running proxy sees it."""
    replicas: ReplicaSet = app.state.registry.get("nudged").replicas["base"]
    return replicas.healths[0]


QUESTION = {"role": "user", "content": "Why do leaves change color in autumn?"}


async def stream_chat(client: httpx.AsyncClient, proxy: str, first_piece: asyncio.Event | None = None
                      ) -> tuple[str, list[dict[str, Any]]]:
    """The text of a streamed chat completion and its error events."""
    body = {"model": "nudged", "messages": [QUESTION], "stream": True, "max_tokens": 40}
    text, errors = "", list[dict[str, Any]]()
    async with client.stream("POST", proxy + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
            if text and first_piece is not None:
                first_piece.set()
    return text, errors


def test_replica_failover_with_streams_in_flight() -> None:
    with simulators() as (first, second, aligned), ExitStack() as stack:
        config = parse_config({"models": [{
            "name": "nudged",
            "base": {"urls": [first.url + "/v1", second.url + "/v1"], "model": "base", "cooldown_seconds": 1,
                     "timeouts": {"read": 20}},
            "nudging": {"url": aligned.url + "/v1", "model": "aligned", "chat_template": "chatml"},
        }]})
        proxy_app = create_app(config)
        proxy = stack.enter_context(running(proxy_app))

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                # Streams that have sent text to their clients when the first replica dies.
                started = [asyncio.Event() for _ in range(4)]
                in_flight = [asyncio.create_task(stream_chat(client, proxy, event)) for event in started]
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
                assert first.served() > 0 and second.served() > 0
                first.kill()
                outcomes = await asyncio.gather(*in_flight)
                failed = [errors for _, errors in outcomes if errors]
                assert failed, "a stream on the killed replica had sent text: it must end with an error"
                for errors in failed:
                    assert len(errors) == 1 and errors[0]["type"] == "upstream_error"
                    assert "base model" in errors[0]["message"] and "127.0.0.1" not in errors[0]["message"]
                assert any(not errors for _, errors in outcomes)  # the other replica's streams finished

                # Restarted on the same port, the replica gets generations again after its cool-down.
                first.start()
                await asyncio.sleep(1.2)
                before = first.served()
                for text, errors in await asyncio.gather(*(stream_chat(client, proxy) for _ in range(4))):
                    assert errors == [] and text
                assert first.served() > before

                # Killed while idle, the proxy learns of it from the next generations it is given;
                # they had sent nothing to their clients, so they are retried on the other replica.
                failures = registry_health(proxy_app).failures
                first.kill()
                for text, errors in await asyncio.gather(*(stream_chat(client, proxy) for _ in range(4))):
                    assert errors == [] and text
                assert registry_health(proxy_app).failures > failures  # it was given the dead replica

        asyncio.run(scenario())
