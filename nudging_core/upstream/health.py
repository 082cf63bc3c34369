"""The health of one replica, shared by its transport and its client."""

from __future__ import annotations

import time
from collections.abc import Callable


class ReplicaHealth:
    """Whether a replica may take new generations: not while it cools down after a failure."""

    def __init__(self, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self.failed_until = 0.0
        self.failures = 0
        # Why the replica's server is known to be down, from whoever runs it (the stack
        # commands watch their local processes); clients add it to "unreachable" errors.
        self.down: str | None = None

    @property
    def available(self) -> bool:
        return self._clock() >= self.failed_until

    def failed(self) -> None:
        self.failures += 1
        self.failed_until = self._clock() + self.cooldown

    def succeeded(self) -> None:
        self.failed_until = 0.0
