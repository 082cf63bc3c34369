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


class UpstreamUnreachable(UpstreamError):
    """An upstream could not be reached, or broke the connection before its answer ended."""


class UpstreamBusy(UpstreamError):
    """All of an upstream's `max_in_flight` slots stayed taken for its `pool` timeout: the
    request never reached it. Not retried: another wait would pass the deadline."""


class ContextOverflow(UpstreamError):
    """The prompt plus the requested tokens exceed the upstream model's context."""


class ContextFull(ContextOverflow):
    """The prompt fits the upstream model's context but fills it: no token can be written.
    vLLM (0.32) shortens `max_tokens` to the room left and refuses a request left with none
    ("max_tokens must be at least 1, got 0"). The answer ends there, with `length`."""


class NoChatTemplate(UpstreamError):
    """`chat_template: auto`, but the upstream's model has no chat template to render
    (a base model, say): the proxy's configuration is wrong, not the client's request."""


def is_retryable(error: UpstreamError) -> bool:
    """Whether asking again (another replica, perhaps) may succeed: the upstream was
    unreachable, timed out or failed on its side (5xx); never a request it refused (4xx)
    or an answer it got wrong (malformed, without logprobs)."""
    if isinstance(error, UpstreamUnreachable | UpstreamTimeout):
        return True
    return error.status_code is not None and error.status_code >= 500
