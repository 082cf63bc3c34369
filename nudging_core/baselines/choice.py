"""The paper's two baselines, one position at a time: which token to write from top-k logprobs.

Both compare token *strings* across models, so the models must share one tokenizer: with
different tokenizers the same text is cut differently and the strings stop meaning the
same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

TopLogprobs = Mapping[str, float]


def _best(scores: Mapping[str, float], tie_break: TopLogprobs) -> str:
    # Highest score; ties go to the base's likelier token, then to the smaller string, so
    # the choice never depends on dict order.
    return min(scores, key=lambda key: (-scores[key], -tie_break.get(key, -math.inf), key))


def ensemble_choice(base: TopLogprobs, chat: TopLogprobs) -> str:
    """The token with the highest summed probability over both top-k lists (a token missing
    from one list counts 0 there)."""
    if not base and not chat:
        raise ValueError("ensemble needs at least one top-k list")
    summed = {key: math.exp(base.get(key, -math.inf)) + math.exp(chat.get(key, -math.inf))
              for key in {*base, *chat}}
    return _best(summed, base)


def proxy_tuning_choice(base: TopLogprobs, chat: TopLogprobs, chat_base: TopLogprobs) -> str | None:
    """Proxy tuning: the base's probability times chat expert over its base (anti-expert),
    argmax over the tokens all three top-k lists share; None when they share none."""
    shared = base.keys() & chat.keys() & chat_base.keys()
    if not shared:
        return None
    # In log space: log p_base + log p_chat - log p_chat_base, the log of the paper's product.
    scores = {key: base[key] + chat[key] - chat_base[key] for key in shared}
    return _best(scores, base)
