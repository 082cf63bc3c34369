"""One completions request, in the proxy's terms, before a dialect puts it on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """One completions request, in the proxy's terms."""

    prompt: str | list[int]  # a text, or token ids a passthrough forwards as they came
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = 1
    stop: tuple[str, ...] = ()
    # Client fields a passthrough method forwards as they came; ours take precedence.
    extra: dict[str, Any] = field(default_factory=dict)
