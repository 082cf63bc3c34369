"""Clients for OpenAI-compatible completions upstreams."""

from .call import CompletionCall
from .client import AnswerCaps, CompletionStream, Timeouts, UpstreamClient
from .dialects import DIALECT_NAMES
from .errors import ContextFull, ContextOverflow, NoChatTemplate, UpstreamBusy, UpstreamError, UpstreamTimeout
from .health import ReplicaHealth
from .memory import MemoryUpstream
from .protocol import Upstream, UpstreamStream
from .replicas import ReplicaSet

__all__ = [
    "AnswerCaps",
    "DIALECT_NAMES",
    "MemoryUpstream",
    "Upstream",
    "UpstreamStream",
    "CompletionCall",
    "CompletionStream",
    "ContextFull",
    "ContextOverflow",
    "NoChatTemplate",
    "ReplicaHealth",
    "ReplicaSet",
    "Timeouts",
    "UpstreamBusy",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamTimeout",
]
