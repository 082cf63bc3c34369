"""Turn OpenAI/vLLM completions choices into `Token`s.

vLLM reports, per generated token, the token string (`bytes:\\x..` for partial UTF-8),
its logprob, a top-k dict and the token's character offset into the decoded text. The
decoded text is what we forward, so token texts are cut from it by those offsets; the raw
token strings are only used when they already join to the text.
"""

from __future__ import annotations

import math
from typing import Any

from nudging_core.types import Token

from .errors import UpstreamError

NEG_INF = -math.inf


def _top_logprob(chosen: float | None, top: dict[str, float] | None) -> float:
    candidates = [v for v in (top or {}).values() if v is not None]
    if chosen is not None:
        candidates.append(chosen)
    return max(candidates) if candidates else NEG_INF


def _token_texts(text: str, tokens: list[str], offsets: list[int] | None) -> list[str]:
    if "".join(tokens) == text:
        return list(tokens)
    if offsets and len(offsets) == len(tokens):
        start = offsets[0]
        relative = [o - start for o in offsets]
        if relative == sorted(relative) and relative[-1] <= len(text):
            bounds = relative + [len(text)]
            return [text[bounds[i] : bounds[i + 1]] for i in range(len(tokens))]
    # Undecodable alignment: keep the text whole on the last token so nothing is lost.
    return [""] * (len(tokens) - 1) + [text] if tokens else []


def parse_tokens(role: str, choice: dict[str, Any], *, need_logprobs: bool) -> list[Token]:
    """Tokens of one choice (a whole completion or one streamed delta)."""
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs")
    if not logprobs or logprobs.get("tokens") is None:
        if need_logprobs and text:
            raise UpstreamError(role, "response carries no logprobs; nudging needs them")
        return [Token(text, 0.0, 0.0)] if text else []
    raw_tokens: list[str] = list(logprobs["tokens"])
    token_logprobs: list[float | None] = list(logprobs.get("token_logprobs") or [None] * len(raw_tokens))
    tops: list[dict[str, float] | None] = list(logprobs.get("top_logprobs") or [None] * len(raw_tokens))
    texts = _token_texts(text, raw_tokens, logprobs.get("text_offset"))
    result = []
    for piece, chosen, top in zip(texts, token_logprobs, tops, strict=False):
        best = _top_logprob(chosen, top)
        if need_logprobs and best == NEG_INF:
            raise UpstreamError(role, "response carries no logprobs; nudging needs them")
        result.append(Token(piece, chosen if chosen is not None else best, best, top))
    return result
