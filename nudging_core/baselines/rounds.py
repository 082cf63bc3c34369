"""One round of a baseline: every model writes a chunk greedily from the same output so far;
the round keeps the tokens they agree on and, at the first disagreement, the combined choice.

As in the paper's code (its `utils.py`, `completion_baseline_ensemble` and
`completion_baseline_proxy_tuning`):
- a chat expert that finished (`finish_reason == "stop"`) supplies its whole chunk and ends
  the generation; nothing else does, short of the budget;
- a combined pick of the end token adds no text: the round keeps what was agreed before it;
- a round that keeps no text at all (the end token picked first, or an empty base chunk)
  writes the first non-empty token of the base's chunk, else of the chat expert's.
Where the paper's code would then ask again for ever (no model wrote any text), we end with
`empty_round`. Provenance: a kept token is the base's when it is the token the base itself
wrote at that position, otherwise the nudger's (the baseline moved the base away from its
own choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nudging_core.types import BaselineEnd, BaselineRule, Completion, Piece, Source, Token

from .choice import ensemble_choice, proxy_tuning_choice

BaselineMethod = Literal["proxy_tuning", "ensemble"]


@dataclass(frozen=True, slots=True)
class Chosen:
    text: str
    source: Source


@dataclass(frozen=True, slots=True)
class RoundDecision:
    chosen: tuple[Chosen, ...]
    # Why the generation ends after this round; None: it goes on.
    finished: BaselineEnd | None = None
    rule: BaselineRule | None = None

    def pieces(self) -> list[Piece]:
        """The chosen tokens as pieces, one per run of a source, one token each."""
        pieces: list[Piece] = []
        for token in self.chosen:
            if pieces and pieces[-1].source == token.source:
                last = pieces[-1]
                text = last.text + token.text
                pieces[-1] = Piece(text, last.source, (*last.token_ends, len(text)))
            else:
                pieces.append(Piece(token.text, token.source, (len(token.text),)))
        return pieces


def token_key(token: Token) -> str:
    """The token's string as its top-k list names it (the decoded text, except for tokens
    that decode to something else, such as an end-of-sequence token decoding to "")."""
    top = token.top_logprobs
    if not top or token.text in top:
        return token.text
    return min(top, key=lambda key: abs(top[key] - token.logprob))


def _is_eos(completion: Completion, index: int) -> bool:
    tokens = completion.tokens
    return completion.finish_reason == "stop" and index == len(tokens) - 1 and tokens[index].text == ""


def _ends(pick: str, index: int, completions: tuple[Completion, ...]) -> bool:
    """A pick ends the text when it is an end-of-sequence token (empty text, or the string
    of a token that ended one of the models' chunks)."""
    return pick == "" or any(
        _is_eos(c, index) and token_key(c.tokens[index]) == pick for c in completions
    )


def _source(pick: str, base: Token) -> Source:
    return "base" if pick == token_key(base) else "nudging"


def _chat_finished(chat: Completion, base: Completion) -> RoundDecision:
    """The chat expert stopped: its whole chunk, the base's while the two agree."""
    chosen: list[Chosen] = []
    agreeing = True
    for index, token in enumerate(chat.tokens):
        if token.text == "":
            continue  # its end-of-sequence token
        agreeing = agreeing and index < len(base.tokens) and token_key(base.tokens[index]) == token_key(token)
        chosen.append(Chosen(token.text, "base" if agreeing else "nudging"))
    return RoundDecision(tuple(chosen), "nudging_model_stop")


def _first_text(completion: Completion, source: Source) -> Chosen | None:
    return next((Chosen(t.text, source) for t in completion.tokens if t.text), None)


def _decided(chosen: list[Chosen], end_picked: bool, base: Completion, chat: Completion) -> RoundDecision:
    """The round's tokens; when they hold no text, the first token with text of the base's
    chunk, else of the chat expert's."""
    if any(token.text for token in chosen):
        return RoundDecision(tuple(chosen), rule="end_pick_dropped" if end_picked else None)
    forced = _first_text(base, "base") or _first_text(chat, "nudging")
    if forced is None:
        return RoundDecision((), "empty_round")
    return RoundDecision((forced,), rule="forced_token")


def ensemble_round(base: Completion, chat: Completion) -> RoundDecision:
    if chat.finish_reason == "stop":
        return _chat_finished(chat, base)
    chosen: list[Chosen] = []
    for index, (ours, theirs) in enumerate(zip(base.tokens, chat.tokens, strict=False)):
        if token_key(ours) == token_key(theirs):
            chosen.append(Chosen(ours.text, "base"))
            continue
        pick = ensemble_choice(ours.top_logprobs or {}, theirs.top_logprobs or {})
        if _ends(pick, index, (base, chat)):
            return _decided(chosen, True, base, chat)
        chosen.append(Chosen(pick, _source(pick, ours)))
        break
    return _decided(chosen, False, base, chat)


def proxy_tuning_round(base: Completion, chat: Completion, chat_base: Completion) -> RoundDecision:
    if chat.finish_reason == "stop":
        return _chat_finished(chat, base)
    chosen: list[Chosen] = []
    for index, tokens in enumerate(zip(base.tokens, chat.tokens, chat_base.tokens, strict=False)):
        ours, expert, anti = tokens
        pick = proxy_tuning_choice(
            ours.top_logprobs or {}, expert.top_logprobs or {}, anti.top_logprobs or {}
        )
        if pick is None:
            pick = token_key(ours)  # nothing shared: the base's own token, as in the paper
        if _ends(pick, index, (base, chat, chat_base)):
            return _decided(chosen, True, base, chat)
        chosen.append(Chosen(pick, _source(pick, ours)))
        if not all(token_key(token) == pick for token in tokens):
            break  # the models' next tokens were written after a different text
    return _decided(chosen, False, base, chat)
