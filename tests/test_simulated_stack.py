"""The proxy in front of the simulator pair, everything over real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import free_port, running

QUESTION = "Why do leaves change color in autumn?"


@dataclass
class Stack:
    proxy: str
    base: str
    aligned: str

    def open_requests(self) -> int:
        return sum(httpx.get(url + "/stats").json()["open_requests"] for url in (self.base, self.aligned))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as stack:
        # Scaled latency: streams last long enough to be interrupted, tests stay quick.
        base = stack.enter_context(running(create_simulator("base", time_scale=0.2)))
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0.2)))
        config = parse_config({"models": [
            {"name": "nudged", "base": {"url": base + "/v1", "model": "base"},
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}},
            {"name": "nudged-paper", "strategy": "paper", "base": {"url": base + "/v1", "model": "base"},
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}},
            {"name": "base", "method": "base_only", "base": {"url": base + "/v1", "model": "base"}},
        ]})
        proxy = stack.enter_context(running(create_proxy(config)))
        yield Stack(proxy, base, aligned)


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], **extra}


def streamed_text(response: httpx.Response) -> str:
    text = ""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


@pytest.mark.parametrize("model", ["nudged", "nudged-paper"])
def test_stream_equals_non_stream_with_defaults(stack: Stack, model: str) -> None:
    whole = httpx.post(stack.proxy + "/v1/chat/completions", json=chat(model), timeout=60).json()
    with httpx.stream("POST", stack.proxy + "/v1/chat/completions", json=chat(model, stream=True),
                      timeout=60) as response:
        assert streamed_text(response) == whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["message"]["content"]


def test_n_choices_with_seed_repeat_and_differ(stack: Stack) -> None:
    body = chat("nudged", n=3, seed=7, temperature=1.0, max_tokens=60)
    first = httpx.post(stack.proxy + "/v1/chat/completions", json=body, timeout=60).json()
    again = httpx.post(stack.proxy + "/v1/chat/completions", json=body, timeout=60).json()
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert texts == [choice["message"]["content"] for choice in again["choices"]]
    assert len(set(texts)) > 1, "choices should be independent samples"
    other_seed = httpx.post(stack.proxy + "/v1/chat/completions", json={**body, "seed": 8}, timeout=60).json()
    assert [c["message"]["content"] for c in other_seed["choices"]] != texts
    assert first["usage"]["completion_tokens"] <= 3 * 60


def test_streamed_n_choices_interleave_and_each_finish(stack: Stack) -> None:
    body = chat("nudged", n=2, seed=1, temperature=0.7, max_tokens=40, stream=True)
    finished: dict[int, str] = {}
    with httpx.stream("POST", stack.proxy + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    if choice["finish_reason"]:
                        finished[choice["index"]] = choice["finish_reason"]
    assert set(finished) == {0, 1}


def test_passthrough_usage_counts(stack: Stack) -> None:
    body = httpx.post(stack.proxy + "/v1/chat/completions", json=chat("base", max_tokens=20), timeout=60)
    body = body.json()
    assert body["usage"]["completion_tokens"] == 20
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] > 5


def test_nudged_usage_counts_the_base_prompt(stack: Stack) -> None:
    body = httpx.post(stack.proxy + "/v1/chat/completions", json=chat("nudged", max_tokens=20), timeout=60)
    body = body.json()
    tokenized = httpx.post(stack.base + "/tokenize", json={"prompt": f"{QUESTION}\n"}).json()["count"]
    assert body["usage"]["prompt_tokens"] == tokenized
    assert body["usage"]["completion_tokens"] == 20


def test_many_generations_share_a_small_upstream_bound() -> None:
    """Probes hold upstream slots while a round is decided; with a bound smaller than one
    round's probes and many generations at once, every request must still finish."""
    questions = [f"Why do leaves change color in autumn, part {i}?" for i in range(16)]
    with ExitStack() as stack:
        base = stack.enter_context(running(create_simulator("base", time_scale=0.02)))
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0.02)))
        config = parse_config({"models": [
            {"name": "nudged", "base": {"url": base + "/v1", "model": "base", "max_in_flight": 4,
                                        "timeouts": {"pool": 20}},
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml",
                         "max_in_flight": 4}}]})
        proxy = stack.enter_context(running(create_proxy(config)))

        async def ask_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=proxy, timeout=120) as client:
                return await asyncio.gather(*(
                    client.post("/v1/chat/completions", json={
                        "model": "nudged", "max_tokens": 80, "messages": [{"role": "user", "content": q}]})
                    for q in questions))

        responses = asyncio.run(ask_all())
        assert [r.status_code for r in responses] == [200] * len(questions)
        assert httpx.get(base + "/stats").json()["open_requests"] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sim_stack_command_serves_and_stops_its_upstreams(tmp_path: Path, signum: int) -> None:
    ports = {role: free_port() for role in ("base", "aligned", "proxy")}
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"name": "nudged", "base": {"url": f"http://127.0.0.1:{ports['base']}/v1", "model": "base"},
         "nudging": {"url": f"http://127.0.0.1:{ports['aligned']}/v1", "model": "aligned",
                     "chat_template": "chatml"}}]}))
    process = subprocess.Popen([sys.executable, "-m", "cli", "sim-stack", "--config", str(config),
                                "--host", "127.0.0.1", "--port", str(ports["proxy"]), "--time-scale", "0"])
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(proxy + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answer = httpx.post(proxy + "/v1/chat/completions", timeout=60, json=chat("nudged", max_tokens=20))
        assert answer.status_code == 200
    finally:
        process.send_signal(signum)
        process.wait(timeout=30)
    for role in ("base", "aligned"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{ports[role]}/health")


def test_sim_stack_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    with running(create_simulator("base", time_scale=0)) as stranger:
        port = int(stranger.rsplit(":", 1)[1])
        config = tmp_path / "stack.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {
                            "name": "b",
                            "method": "base_only",
                            "base": {"url": f"http://127.0.0.1:{port}/v1", "model": "base"},
                        }
                    ]
                }
            )
        )
        done = subprocess.run([sys.executable, "-m", "cli", "sim-stack", "--config", str(config),
                               "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"port {port} already in use" in done.stderr
