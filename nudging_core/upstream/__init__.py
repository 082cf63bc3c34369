"""Clients for OpenAI-compatible completions upstreams."""

from .client import CompletionCall, CompletionStream, Timeouts, UpstreamClient
from .errors import ContextOverflow, UpstreamError, UpstreamTimeout

__all__ = [
    "CompletionCall",
    "CompletionStream",
    "ContextOverflow",
    "Timeouts",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamTimeout",
]
