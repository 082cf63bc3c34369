"""Passthrough models forward an upstream's stream, but never past the client's budget: an
upstream that writes on and on is stopped at `max_tokens`, and its request closed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from nudging_core.config import parse_config
from server.app import create_app

from .servers import running


@dataclass
class Endless:
    """A completions and chat server whose streams never end (it ignores `max_tokens`)."""

    open_streams: int = 0
    events_sent: int = 0

    def app(self) -> Starlette:
        async def completions(request: Request) -> StreamingResponse:
            await request.body()
            return StreamingResponse(self._events({"text": " word"}), media_type="text/event-stream")

        async def chat(request: Request) -> StreamingResponse:
            await request.body()
            return StreamingResponse(self._events({"delta": {"content": " word"}}),
                                     media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/chat/completions", chat, methods=["POST"])])

    async def _events(self, written: dict[str, Any]) -> AsyncIterator[str]:
        self.open_streams += 1
        try:
            while True:
                self.events_sent += 1
                choice = {"index": 0, **written, "finish_reason": None, "logprobs": None}
                yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [choice]})}\n\n"
                await asyncio.sleep(0.001)
        finally:
            self.open_streams -= 1


@pytest.fixture(scope="module")
def endless() -> Iterator[tuple[Endless, str]]:
    upstream = Endless()
    with running(upstream.app()) as upstream_url:
        base = {"url": upstream_url + "/v1", "model": "m", "dialect": "vllm"}
        config = parse_config({"models": [
            {"name": "base-only", "method": "base_only", "base": base},
            {"name": "chat-only", "method": "base_only", "passthrough": "chat", "base": base}]})
        with running(create_app(config)) as proxy:
            yield upstream, proxy


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_an_endless_upstream_stream_ends_at_max_tokens(endless: tuple[Endless, str], stream: bool) -> None:
    upstream, proxy = endless
    body = {"model": "base-only", "prompt": "Once", "max_tokens": 5, "stream": stream}
    response = httpx.post(proxy + "/v1/completions", json=body, timeout=10)
    assert response.status_code == 200
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = response.json()["choices"][0]
        text, finish = choice["text"], choice["finish_reason"]
    assert (text, finish) == (" word" * 5, "length")
    sent = upstream.events_sent
    for _ in range(100):
        if upstream.open_streams == 0:
            break
        time.sleep(0.02)
    assert upstream.open_streams == 0, "the upstream request is closed"
    assert upstream.events_sent - sent < 50


def test_an_endless_upstream_chat_stream_ends_at_max_tokens(endless: tuple[Endless, str]) -> None:
    # A chat stream is the upstream's, chunk by chunk; each chunk that writes is at least a token.
    upstream, proxy = endless
    body = {"model": "chat-only", "messages": [{"role": "user", "content": "Once"}], "max_tokens": 5,
            "stream": True}
    response = httpx.post(proxy + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [choice for event in events[:-1] for choice in json.loads(event)["choices"]]
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == " word" * 5
    assert [choice["finish_reason"] for choice in choices][-1] == "length"
    for _ in range(100):
        if upstream.open_streams == 0:
            break
        time.sleep(0.02)
    assert upstream.open_streams == 0, "the upstream request is closed"
