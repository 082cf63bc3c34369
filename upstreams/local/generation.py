"""One completion as a sequence of steps: sampling, logprobs, UTF-8 pieces and stop strings.

The loop works on any :class:`Model` (the llama.cpp one is engine.py's), so it can be checked
on crafted token sequences without a model file, and importing it needs no llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..openai_api import Sampling
from .sampling import GREEDY_BELOW, Logits, choose, log_normalizer, top_k
from .text import StopStrings, Utf8Pieces


class EngineError(RuntimeError):
    """The model could not be loaded, or refused to evaluate."""


@dataclass(frozen=True, slots=True)
class Prefill:
    """How a prompt was brought into the KV cache."""

    reused: int  # prompt tokens whose keys/values were already cached
    evaluated: int  # prompt tokens computed now


class Model(Protocol):
    """What generation needs from a model holding one sequence."""

    def prefill(self, prompt: Sequence[int]) -> Prefill: ...
    def advance(self, token: int) -> None: ...
    def logits(self) -> Logits: ...
    def is_end(self, token: int) -> bool: ...
    def piece(self, token: int) -> bytes: ...
    def label(self, token: int) -> str: ...


@dataclass(slots=True)
class Step:
    """One generated token (an end token included, with empty text, as vLLM counts it)."""

    token_id: int
    piece: str  # text this token added to the generated text ("" while a character is split)
    offset: int  # where `piece` starts in the generated text
    delta: str  # text released to the client with this step (stop-string prefixes held back)
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass(slots=True)
class GenerationResult:
    """What one generation did, filled in as it runs."""

    prompt_tokens: int = 0
    prompt_reused: int = 0
    prompt_evaluated: int = 0
    text: str = ""  # the generated text as returned (cut before a stop string)
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | None = None
    steps: list[Step] = field(default_factory=list)


def generate(model: Model, prompt: Sequence[int], sampling: Sampling, outcome: GenerationResult,
             cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
    """Yield the steps of one completion of `prompt`; stops early when `cancelled()` says so.

    `outcome.finish_reason` stays None for a cancelled generation.
    """
    prefill = model.prefill(prompt)
    outcome.prompt_tokens = len(prompt)
    outcome.prompt_reused, outcome.prompt_evaluated = prefill.reused, prefill.evaluated
    rng = (np.random.default_rng(sampling.seed) if sampling.temperature >= GREEDY_BELOW
           else None)
    decoder = Utf8Pieces()
    stops = StopStrings(sampling.stop)
    text = ""
    released = 0
    for index in range(sampling.max_tokens):
        if cancelled():
            return
        logits = model.logits()
        token = choose(logits, sampling.temperature, sampling.top_p, rng)
        step = Step(token, "", len(text), "")
        if sampling.logprobs is not None:
            step.logprob, step.top_logprobs = _logprobs(model, logits, token, sampling.logprobs)
        outcome.completion_tokens += 1
        if model.is_end(token):
            # Nothing can follow: text held back for a possible stop string is released.
            step.delta = text[released:]
            step.finish_reason = outcome.finish_reason = "stop"
        else:
            step.piece = decoder.feed(model.piece(token))
            text += step.piece
            hit = stops.find(text, len(step.piece))
            if hit is not None:
                step.delta = text[released:hit.index] if hit.index > released else ""
                text = text[:hit.index]
                step.finish_reason = outcome.finish_reason = "stop"
                step.stop_reason = outcome.stop_reason = hit.stop
            elif index == sampling.max_tokens - 1:
                step.delta = text[released:]
                step.finish_reason = outcome.finish_reason = "length"
            else:
                end = stops.releasable(text, released)
                step.delta, released = text[released:end], end
        outcome.text = text
        outcome.steps.append(step)
        yield step
        if step.finish_reason is not None:
            return
        model.advance(token)
    outcome.finish_reason = "length"  # max_tokens == 0


def _logprobs(model: Model, logits: Logits, chosen: int, k: int,
              ) -> tuple[float, dict[str, float]]:
    """The chosen token's logprob and the top k (plus the chosen one, as vLLM reports)."""
    normalizer = log_normalizer(logits)
    top: dict[str, float] = {}
    for token in top_k(logits, k):
        # Two ids may share a string; the more likely one (seen first) keeps the key.
        top.setdefault(model.label(token), float(logits[token]) - normalizer)
    chosen_logprob = float(logits[chosen]) - normalizer
    top.setdefault(model.label(chosen), chosen_logprob)
    return chosen_logprob, top
