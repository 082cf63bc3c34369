"""A baseline generation: rounds of concurrent chunk requests until the chat expert stops or
the budget is used up, as in the paper's code (`rounds.py` says how a round decides).

Each round asks every model for `chunk_tokens` greedy tokens with top-k logprobs from its
own prompt plus the output so far (the chat expert its chat prompt, the base models the
plain one), as the paper's code does; the roles and the top-k are the method's row in
`nudging_core.methods.METHODS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from nudging_core.calls import RoleCaller
from nudging_core.stopping import Budget
from nudging_core.types import Completion, GenerationStats, Piece, Role
from nudging_core.upstream import UpstreamError

from .rounds import BaselineMethod, RoundDecision, ensemble_round, proxy_tuning_round

SHARED_TOKENIZER = "compares token strings, so its models must share one tokenizer"


class TokenizerMismatch(UpstreamError):
    """The upstreams of a baseline tokenize the same text differently."""


@dataclass(slots=True)
class BaselineContext:
    method: BaselineMethod
    roles: tuple[Role, ...]  # the models it asks each round (nudging_core.methods.METHODS)
    top_k: int
    callers: Mapping[Role, RoleCaller]
    base_prompt: str
    nudging_prompt: str
    chunk_tokens: int
    budget: Budget
    stats: GenerationStats
    output: str = field(default="")

    def prompt(self, role: Role) -> str:
        return (self.nudging_prompt if role == "nudging" else self.base_prompt) + self.output


async def _all_or_none(calls: list[Coroutine[Any, Any, Completion]]) -> list[Completion]:
    """All completions; when one call fails, the others are cancelled before the error rises."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def check_shared_tokenizer(context: BaselineContext) -> None:
    """Raise TokenizerMismatch when the upstreams count the base prompt differently (only
    upstreams that offer a tokenizer endpoint are compared)."""
    roles = context.roles
    prompt = context.base_prompt
    counts = await asyncio.gather(*(context.callers[r].client.count_tokens(prompt) for r in roles))
    known = {role: count for role, count in zip(roles, counts, strict=True) if count is not None}
    if len(set(known.values())) > 1:
        detail = ", ".join(f"{role} {count}" for role, count in known.items())
        raise TokenizerMismatch(
            "nudging",
            f"{context.method} {SHARED_TOKENIZER}; the upstreams count the prompt as {detail} tokens",
        )


async def _round(context: BaselineContext) -> RoundDecision:
    roles = context.roles
    max_tokens = min(context.chunk_tokens, context.budget.remaining)
    completions = await _all_or_none([
        context.callers[role].complete(
            context.prompt(role), max_tokens, round_index=context.stats.rounds, logprobs=context.top_k
        )
        for role in roles
    ])
    for role, completion in zip(roles, completions, strict=True):
        if any(token.top_logprobs is None for token in completion.tokens):
            raise UpstreamError(role, f"no top-k logprobs in the answer; {context.method} needs them")
    if context.method == "ensemble":
        return ensemble_round(*completions)
    return proxy_tuning_round(*completions)


async def generate_baseline(context: BaselineContext) -> AsyncGenerator[Piece, None]:
    stats = context.stats
    checking: asyncio.Task[None] | None = asyncio.create_task(check_shared_tokenizer(context))
    try:
        while not context.budget.exhausted:
            stats.rounds += 1
            deciding = asyncio.ensure_future(_round(context))
            if checking is not None:
                # Once per generation, before anything is sent: a mismatch is the error to
                # report even when the first round fails because of it.
                try:
                    await checking
                except BaseException:
                    deciding.cancel()
                    await asyncio.gather(deciding, return_exceptions=True)
                    raise
                checking = None
            decision = await deciding
            if decision.rule is not None:
                stats.fire(decision.rule)
            cut = False
            for piece in decision.pieces():
                taken = context.budget.take(piece)
                cut = cut or taken != piece
                context.output += taken.text
                if taken.num_tokens:
                    yield taken
            if decision.finished is not None and not cut:
                stats.fire(decision.finished)
                stats.stop_reason = decision.finished
                return
        stats.stop_reason = "length"
    finally:
        if checking is not None:
            checking.cancel()
