"""Several replicas of one upstream: spread generations, skip a failed replica for a while.

The proxy keeps one generation on one replica (its prompt grows by a few tokens per request,
so the replica's prefix cache does most of the prefill); a generation moves only when it is
retried after a failure. A replica fails when it cannot be reached, answers 5xx or breaks a
stream; it is then skipped for a cool-down, after which the next generation tries it again
and a success brings it back.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

import httpx

from .client import AnswerCaps, Timeouts, UpstreamClient
from .health import ReplicaHealth
from .network import AsyncioTransport

DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_CAPS = AnswerCaps()


class _ObservedStream(httpx.AsyncByteStream):
    """A response body whose transport failures (a cut or stalled stream) fail the replica."""

    def __init__(self, inner: httpx.AsyncByteStream, health: ReplicaHealth) -> None:
        self._inner = inner
        self._health = health

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError:
            self._health.failed()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class HealthTransport(httpx.AsyncBaseTransport):
    """Records each exchange's outcome in the replica's health, below the client's error mapping."""

    def __init__(self, inner: httpx.AsyncBaseTransport, health: ReplicaHealth) -> None:
        self._inner = inner
        self._health = health

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.PoolTimeout:
            raise  # our own connection pool is full: the replica is not at fault
        except httpx.TransportError:
            self._health.failed()
            raise
        if response.status_code >= 500:
            self._health.failed()
        else:
            self._health.succeeded()
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ObservedStream(response.stream, self._health),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class ReplicaSet:
    """The replicas serving one role of a model, picked round-robin among the available ones."""

    def __init__(self, clients: Sequence[UpstreamClient], healths: Sequence[ReplicaHealth]) -> None:
        if not clients or len(clients) != len(healths):
            raise ValueError("a replica set needs one health per client, and at least one client")
        self.clients = list(clients)
        self.healths = list(healths)
        self._turn = itertools.count()

    @classmethod
    def connect(
        cls,
        urls: Sequence[str],
        model: str,
        *,
        role: str,
        api_key: str | None = None,
        dialect: str = "auto",
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        caps: AnswerCaps = DEFAULT_CAPS,
        max_in_flight: int = 64,
        cooldown: float = 10.0,
    ) -> ReplicaSet:
        """One pooled client per URL, each bounded by `max_in_flight`."""
        clients, healths = [], []
        for url in urls:
            health = ReplicaHealth(cooldown)
            pool = AsyncioTransport(
                httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
            )
            clients.append(
                UpstreamClient(
                    url, model, role=role, api_key=api_key, dialect=dialect, timeouts=timeouts, caps=caps,
                    max_in_flight=max_in_flight, transport=HealthTransport(pool, health), health=health,
                )
            )
            healths.append(health)
        return cls(clients, healths)

    def pick(self) -> UpstreamClient:
        """The next available replica; if all cool down, the one that recovers first."""
        turn = next(self._turn)
        count = len(self.clients)
        for offset in range(count):
            index = (turn + offset) % count
            if self.healths[index].available:
                return self.clients[index]
        soonest = min(range(count), key=lambda index: self.healths[index].failed_until)
        return self.clients[soonest]

    async def readiness(self) -> list[bool]:
        return list(await asyncio.gather(*(client.ready() for client in self.clients)))

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))
