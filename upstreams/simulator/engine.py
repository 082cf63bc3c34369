"""Generation: sampling, stop strings, the latency schedule and the server's counters.

The engine is independent of HTTP: :meth:`Engine.generate` yields one :class:`Step` per
generated token, already paced by the latency model, and the web layer turns steps into JSON
or SSE chunks.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from ..openai_api import Counters, Sampling
from .documents import EOS
from .latency import LatencyModel, PrefixCache, Schedule
from .model import Distribution, LanguageModel, logprob
from .tokenizer import pieces, reported_tokens


@dataclass(slots=True)
class Stats(Counters):
    open_requests: int = 0
    requests_total: int = 0
    requests_cancelled: int = 0
    tokens_generated: int = 0
    prompt_tokens_total: int = 0
    prompt_tokens_cached: int = 0


@dataclass(slots=True)
class Step:
    """One generated token (EOS included, with empty text, as vLLM reports it)."""

    token: str
    logprob: float | None  # None only where vLLM has none (a prompt's first token)
    top_logprobs: dict[str, float] | None
    offset: int  # where the token starts in the generated text
    text: str  # text released to the client with this step (stop strings held back)
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass(slots=True)
class GenerationResult:
    """What a whole generation produced, filled in as it runs."""

    text: str = ""  # the generated text as returned (cut before a stop string)
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | None = None


def choose(distribution: Distribution, temperature: float, top_p: float,
           rng: random.Random | None) -> int:
    """Index of the sampled candidate: greedy at temperature 0, else p^(1/T) with top-p."""
    if temperature <= 1e-5 or rng is None or len(distribution) == 1:
        return 0
    logs = [math.log(max(p, 1e-300)) for _, p in distribution]
    top = max(logs)
    weights = [math.exp((lp - top) / temperature) for lp in logs]
    total = sum(weights)
    probabilities = [w / total for w in weights]
    order = sorted(range(len(distribution)), key=lambda i: -probabilities[i])
    kept: list[int] = []
    mass = 0.0
    for i in order:
        kept.append(i)
        mass += probabilities[i]
        if mass >= top_p - 1e-12:
            break
    draw = rng.random() * sum(probabilities[i] for i in kept)
    for i in kept:
        draw -= probabilities[i]
        if draw <= 0:
            return i
    return kept[-1]


def top_logprobs(distribution: Distribution, k: int, chosen: int) -> dict[str, float]:
    """The k most likely tokens, plus the sampled one if it is not among them (as vLLM does)."""
    entries = {token: logprob(p) for token, p in distribution[:k]}
    token, p = distribution[chosen]
    entries.setdefault(token, logprob(p))
    return entries


def reported_logprobs(token: str, value: float | None, top: dict[str, float] | None,
                      ) -> list[tuple[str, float | None, dict[str, float] | None]]:
    """Each token the server reports for `token` (see tokenizer.pieces), with its logprob
    and top-k dict.

    The first byte token of a split character carries the choice; the others are certain.
    Every candidate that starts a split character decodes to "" at the first one, so they
    share one key there and, as in vLLM, the last of them (the least likely) sets its value,
    which can be below the chosen token's own logprob.
    """
    reported = pieces(token)
    if len(reported) == 1:
        return [(token, value, top)]
    first_top = None if top is None else {pieces(t)[0]: lp for t, lp in top.items()}
    return [("", value, first_top)] + [(piece, 0.0, None if top is None else {piece: 0.0})
                                      for piece in reported[1:]]


def find_stop(text: str, new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The first stop string (in request order) that the last `new_chars` characters complete."""
    for stop in stops:
        index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if index != -1:
            return index, stop
    return None


class Engine:
    def __init__(self, model: LanguageModel, latency: LatencyModel, time_scale: float) -> None:
        self.model = model
        self.latency = latency
        self.time_scale = time_scale
        self.cache = PrefixCache(latency.block_tokens, latency.cache_tokens)
        self.stats = Stats()

    async def generate(self, prompt: str, prompt_tokens: list[str], sampling: Sampling,
                       outcome: GenerationResult, *, prompt_logprobs: bool = False,
                       ) -> AsyncGenerator[Step, None]:
        """Yield the steps of one generation, paced by the latency model.

        Stats are kept here: the request is open until the generator finishes or is closed
        (a client disconnect cancels it), and counted as cancelled if it did not finish.
        A request for prompt logprobs (echo with logprobs) computes its whole prompt, as vLLM
        skips the prefix cache for such requests.
        """
        stats = self.stats
        stats.open_requests += 1
        stats.requests_total += 1
        stats.prompt_tokens_total += len(prompt_tokens)
        try:
            cached = 0 if prompt_logprobs else self.cache.cached_tokens(prompt_tokens)
            stats.prompt_tokens_cached += cached
            schedule = Schedule(self.latency, self.time_scale, len(prompt_tokens) - cached)
            await schedule.until_prefilled()
            self.cache.add(prompt_tokens)
            async for step in self._steps(prompt, sampling, outcome, schedule):
                yield step
            if outcome.finish_reason is None:
                outcome.finish_reason = "length"
            self.cache.add(prompt_tokens + reported_tokens(outcome.text))
        finally:
            stats.open_requests -= 1
            if outcome.finish_reason is None:
                stats.requests_cancelled += 1

    async def _steps(self, prompt: str, sampling: Sampling, outcome: GenerationResult,
                     schedule: Schedule) -> AsyncGenerator[Step, None]:
        rng: random.Random | None = None
        if sampling.temperature > 1e-5:
            rng = random.Random(sampling.seed) if sampling.seed is not None else random.Random()
        cursor = self.model.start(prompt)
        stops = list(sampling.stop)
        hold = max((len(s) for s in stops), default=1) - 1  # chars that may start a stop string
        generated = ""
        released = 0
        while outcome.completion_tokens < sampling.max_tokens:
            distribution = cursor.distribution()
            chosen = choose(distribution, sampling.temperature, sampling.top_p, rng)
            token, probability = distribution[chosen]
            offset = len(generated)
            top = (top_logprobs(distribution, sampling.logprobs, chosen)
                   if sampling.logprobs is not None else None)
            # A split character's byte tokens come first, with no text.
            *leading, (_, value, top) = reported_logprobs(token, logprob(probability), top)
            for _, piece_value, piece_top in leading:
                if await self._count_token(schedule, outcome, sampling.max_tokens):
                    outcome.text = generated
                    outcome.finish_reason = "length"
                    yield Step("", piece_value, piece_top, offset, generated[released:], "length")
                    return
                yield Step("", piece_value, piece_top, offset, "")
            last = await self._count_token(schedule, outcome, sampling.max_tokens)
            if token == EOS:
                step = Step(token, value, top, offset, generated[released:], "stop")
                outcome.text = generated
                outcome.finish_reason = "stop"
                yield step
                return
            generated += token
            cursor.advance(token)
            hit = find_stop(generated, len(token), stops) if stops else None
            if hit is not None:
                cut, stop = hit
                text = generated[released:cut] if cut > released else ""
                outcome.text = generated[:cut]
                outcome.finish_reason, outcome.stop_reason = "stop", stop
                yield Step(token, value, top, offset, text, "stop", stop)
                return
            if last:
                outcome.text = generated
                outcome.finish_reason = "length"
                yield Step(token, value, top, offset, generated[released:],
                           "length")
                return
            releasable = max(released, len(generated) - hold)
            text = generated[released:releasable]
            released = releasable
            outcome.text = generated
            yield Step(token, value, top, offset, text)

    async def _count_token(self, schedule: Schedule, outcome: GenerationResult, max_tokens: int) -> bool:
        """Pay for one generated token; whether it is the last the budget allows."""
        await schedule.next_token()  # every token costs a forward pass, the first included
        outcome.completion_tokens += 1
        self.stats.tokens_generated += 1
        return outcome.completion_tokens == max_tokens
