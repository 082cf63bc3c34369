"""Admission control per model: at most `max_concurrent` requests run at once, at most
`max_queued` more wait, each for at most `queue_timeout_seconds`; beyond that a request gets a
429 with Retry-After before any upstream work.

Under overload, a fixed number of requests running at their unloaded speed finish within
their clients' deadlines; letting every request in slows all of them together until none do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from nudging_core.errors import APIError, overloaded

# A running request frees its place whenever it ends; there is no better guess than soon.
RETRY_AFTER_SECONDS = 1

T = TypeVar("T")


@dataclass(slots=True)
class Ticket:
    """A request's place among the running ones; given back once (later calls do nothing)."""

    _gate: Admission | None

    def release(self) -> None:
        if self._gate is not None:
            self._gate._leave()
            self._gate = None


@dataclass(slots=True)
class Admission:
    """The admission gate of one model. `max_concurrent` None: every request runs at once."""

    model: str
    max_concurrent: int | None
    max_queued: int
    queue_timeout: float
    running: int = 0
    queued: int = 0
    _free: asyncio.Semaphore | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.max_concurrent is not None:
            self._free = asyncio.Semaphore(self.max_concurrent)

    async def admit(self) -> Ticket:
        """A place to run, once one is free; raises the 429 `APIError` when the queue is full
        or the wait outlasts the deadline."""
        if self._free is not None:
            await self._wait_for_place(self._free)
        self.running += 1
        return Ticket(self)

    async def _wait_for_place(self, free: asyncio.Semaphore) -> None:
        if free.locked() and self.queued >= self.max_queued:
            raise self._rejection(f"{self.running} requests are running and {self.queued} waiting")
        self.queued += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await free.acquire()
        except TimeoutError:
            raise self._rejection(f"no place freed up within {self.queue_timeout:g} s") from None
        finally:
            self.queued -= 1

    def _leave(self) -> None:
        self.running -= 1
        if self._free is not None:
            self._free.release()

    def _rejection(self, why: str) -> APIError:
        return overloaded(self.model, why, RETRY_AFTER_SECONDS)


async def holding(ticket: Ticket, items: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`items`, with `ticket` given back when they end or are closed."""
    try:
        async with aclosing(items):
            async for item in items:
                yield item
    finally:
        ticket.release()
