"""Failures of upstream calls, named by the role of the failing upstream.

Messages never contain the upstream's address or credentials: they reach clients.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream answered with an error or could not be reached."""

    def __init__(self, role: str, message: str, *, status_code: int | None = None) -> None:
        super().__init__(f"{role} upstream: {message}")
        self.role = role
        self.message = message
        self.status_code = status_code


class UpstreamTimeout(UpstreamError):
    """An upstream did not answer within the configured timeout."""


class ContextOverflow(UpstreamError):
    """The prompt plus the requested tokens exceed the upstream model's context."""
