"""Async client for one OpenAI-compatible `/v1/completions` upstream.

One pooled httpx client per upstream, a bound on requests in flight, and streams whose
early exit closes the HTTP response: vLLM aborts a request when its client disconnects,
so leaving a stream is how the proxy cancels upstream work it no longer needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from nudging_core.types import Completion, Token

from .errors import ContextOverflow, UpstreamError, UpstreamTimeout
from .parse import parse_tokens

CONTEXT_OVERFLOW_MARKERS = ("maximum context length", "context length", "exceeds the available context")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 60.0  # also the longest wait between two stream events
    write: float = 10.0
    pool: float = 60.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """One completions request, in the proxy's terms."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = 1
    stop: tuple[str, ...] = ()
    # Client fields a passthrough method forwards as they came; ours take precedence.
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, model: str, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra,
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": stream,
        }
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def _error_message(role: str, response_text: str) -> str:
    try:
        payload = json.loads(response_text)
    except ValueError:
        return response_text[:200] or "empty error body"
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]


def _raise_for_status(role: str, status: int, body_text: str) -> None:
    if status < 400:
        return
    message = _error_message(role, body_text)
    if status == 400 and any(marker in message.lower() for marker in CONTEXT_OVERFLOW_MARKERS):
        raise ContextOverflow(role, message, status_code=status)
    raise UpstreamError(role, f"HTTP {status}: {message}", status_code=status)


class UpstreamClient:
    """A pooled connection to one upstream serving one model."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        role: str,
        api_key: str | None = None,
        timeouts: Timeouts = Timeouts(),
        max_in_flight: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.role = role
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/",
            headers=headers,
            timeout=timeouts.to_httpx(),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            transport=transport,
        )
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_model_len: int | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, call: CompletionCall) -> Completion:
        async with self._slots:
            try:
                response = await self._http.post("completions", json=call.body(self.model, stream=False))
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(self.role, "timed out") from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(self.role, f"unreachable ({type(exc).__name__})") from exc
            _raise_for_status(self.role, response.status_code, response.text)
            try:
                payload = response.json()
                choice = payload["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise UpstreamError(self.role, "malformed completions response") from exc
            tokens = parse_tokens(self.role, choice, need_logprobs=call.logprobs is not None)
            usage = payload.get("usage") or {}
            return Completion(tuple(tokens), choice.get("finish_reason"), usage.get("prompt_tokens"))

    def stream(self, call: CompletionCall) -> CompletionStream:
        return CompletionStream(self, call)

    async def count_tokens(self, prompt: str) -> int | None:
        """Prompt size by the upstream's own tokenizer (vLLM's `/tokenize`), if it has one."""
        root = str(self._http.base_url).rstrip("/").removesuffix("/v1")
        try:
            response = await self._http.post(f"{root}/tokenize", json={"model": self.model, "prompt": prompt})
            count = response.json().get("count") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    async def ready(self) -> bool:
        try:
            response = await self._http.get("models")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def max_model_len(self) -> int | None:
        """The upstream's context length as its `/v1/models` reports it (vLLM does)."""
        if self._max_model_len is None:
            try:
                response = await self._http.get("models")
                cards = response.json().get("data", [])
            except (httpx.HTTPError, ValueError, AttributeError):
                return None
            for card in cards:
                if card.get("id") == self.model and isinstance(card.get("max_model_len"), int):
                    self._max_model_len = card["max_model_len"]
        return self._max_model_len


class CompletionStream:
    """A streamed completion: iterate tokens; leaving the `async with` closes the request."""

    def __init__(self, client: UpstreamClient, call: CompletionCall) -> None:
        self._client = client
        self._call = call
        self._response: httpx.Response | None = None
        self._slot_held = False
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completed = False

    async def __aenter__(self) -> CompletionStream:
        client = self._client
        await client._slots.acquire()
        self._slot_held = True
        request = client._http.build_request(
            "POST", "completions", json=self._call.body(client.model, stream=True)
        )
        try:
            self._response = await client._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            self._release()
            raise UpstreamTimeout(client.role, "timed out") from exc
        except httpx.HTTPError as exc:
            self._release()
            raise UpstreamError(client.role, f"unreachable ({type(exc).__name__})") from exc
        except BaseException:
            self._release()
            raise
        if self._response.status_code >= 400:
            body = (await self._response.aread()).decode("utf-8", "replace")
            await self._close()
            _raise_for_status(client.role, self._response.status_code, body)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    def _release(self) -> None:
        if self._slot_held:
            self._slot_held = False
            self._client._slots.release()

    async def _close(self) -> None:
        try:
            if self._response is not None:
                await self._response.aclose()
        finally:
            self._release()

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[Token]:
        assert self._response is not None, "use `async with` before iterating"
        role = self._client.role
        need_logprobs = self._call.logprobs is not None
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    self.completed = True
                    return
                try:
                    payload = json.loads(data)
                except ValueError as exc:
                    raise UpstreamError(role, "malformed stream event") from exc
                if "error" in payload:
                    raise UpstreamError(role, f"stream error: {_error_message(role, data)}")
                usage = payload.get("usage")
                if usage:
                    self.prompt_tokens = usage.get("prompt_tokens")
                for choice in payload.get("choices") or []:
                    for token in parse_tokens(role, choice, need_logprobs=need_logprobs):
                        yield token
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(role, "timed out mid-stream") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(role, f"stream interrupted ({type(exc).__name__})") from exc
        if self.finish_reason is None:
            raise UpstreamError(role, "stream ended without a finish reason")
        self.completed = True
