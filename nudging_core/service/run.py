"""Running the plans of a request: one generation per choice, concurrently, as events.

`run` yields a `PieceEvent` per piece of text, a `ChoiceFinished` per choice, then one
`UsageEvent`; an upstream failure ends it with an `ErrorEvent` carrying the client's error. A
choice whose upstream fails before any of its text reached the client starts again (retries),
or answers with the base model alone (`on_nudger_failure: base_only`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from nudging_core.errors import APIError, scrub_urls, upstream_failure
from nudging_core.generation import Generation, GenerationRequest
from nudging_core.registry import ServedModel
from nudging_core.types import Piece
from nudging_core.upstream import ContextOverflow, UpstreamError
from nudging_core.upstream.errors import is_retryable

from .plan import ChoicePlan


@dataclass(slots=True)
class ChoiceRun:
    """A choice's generation and the pieces it sent, for the response body and its extension."""

    index: int
    generation: Generation
    pieces: list[Piece] = field(default_factory=list)
    fallback_reason: str | None = None  # why this choice fell back to the base model alone

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)

    def restart(self, generation: Generation) -> None:
        self.generation = generation
        self.pieces.clear()


@dataclass(frozen=True, slots=True)
class PieceEvent:
    choice: ChoiceRun
    piece: Piece


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    choice: ChoiceRun  # its finish reason and stats are final


@dataclass(frozen=True, slots=True)
class UsageEvent:
    prompt_tokens: int
    completion_tokens: int
    # A passthrough upstream's build, which vLLM sends once per answer.
    system_fingerprint: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: APIError  # the last event: what the client is told


Event = PieceEvent | ChoiceFinished | UsageEvent | ErrorEvent


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """What a choice does when an upstream fails before any of its text reached the client."""

    served: ServedModel
    streaming: bool  # a streamed choice's pieces reach the client as they come

    def retry(self, run: ChoiceRun, error: UpstreamError, retries_left: int) -> bool:
        """Start `run` again, on freshly picked replicas, if that is safe and may help."""
        if not self._restartable(run) or retries_left <= 0 or not is_retryable(error):
            return False
        run.restart(new_generation(self.served, run.generation.request))
        return True

    def fall_back(self, run: ChoiceRun, error: UpstreamError) -> bool:
        """Answer with the base model alone, if configured and the nudger is what failed."""
        request = run.generation.request
        if (self.served.config.on_nudger_failure != "base_only" or error.role == "base"
                or isinstance(error, ContextOverflow) or request.method == "base_only"
                or not self._restartable(run)):
            return False
        # The base alone forwards none of the client's fields but the logprobs it asked for.
        fields = {"logprobs": request.top_logprobs} if request.return_logprobs else {}
        run.restart(new_generation(self.served, dataclasses.replace(
            request, method="base_only", passthrough_fields=fields)))
        run.fallback_reason = scrub_urls(str(error))
        return True

    def _restartable(self, run: ChoiceRun) -> bool:
        return not (self.streaming and any(piece.text for piece in run.pieces))


def new_generation(served: ServedModel, request: GenerationRequest) -> Generation:
    """A generation on the replicas the model picks now (so a retry may land on another)."""
    return Generation(request, served.pick_clients())


async def _choice_pieces(run: ChoiceRun, policy: RecoveryPolicy) -> AsyncGenerator[Piece, None]:
    """The pieces of one choice, started again after a failure as `policy` allows."""
    retries_left = policy.served.config.retries
    while True:
        try:
            async with aclosing(run.generation.pieces()) as pieces:
                async for piece in pieces:
                    run.pieces.append(piece)
                    yield piece
            return
        except UpstreamError as error:
            if policy.retry(run, error, retries_left):
                retries_left -= 1
            elif not policy.fall_back(run, error):
                raise


async def _choices(
    runs: list[ChoiceRun], policy: RecoveryPolicy
) -> AsyncGenerator[PieceEvent | ChoiceFinished, None]:
    """Pieces of all choices as they come; an error in one cancels the others."""
    if len(runs) == 1:
        run = runs[0]
        async with aclosing(_choice_pieces(run, policy)) as pieces:
            async for piece in pieces:
                yield PieceEvent(run, piece)
        yield ChoiceFinished(run)
        return
    queue: asyncio.Queue[PieceEvent | ChoiceFinished | BaseException] = asyncio.Queue()

    async def produce(run: ChoiceRun) -> None:
        try:
            async with aclosing(_choice_pieces(run, policy)) as pieces:
                async for piece in pieces:
                    await queue.put(PieceEvent(run, piece))
            await queue.put(ChoiceFinished(run))
        except Exception as error:  # handed to the consumer, which re-raises it
            await queue.put(error)

    tasks = [asyncio.create_task(produce(run)) for run in runs]
    try:
        finished = 0
        while finished < len(runs):
            event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            finished += isinstance(event, ChoiceFinished)
            yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(runs: list[ChoiceRun]) -> UsageEvent:
    # The choices of a prompt share it; its first choice measured it. A batch sums its prompts.
    prompt_tokens = sum(run.generation.prompt_tokens for run in runs
                        if run.generation.request.choice_index == 0)
    return UsageEvent(prompt_tokens, sum(run.generation.completion_tokens for run in runs),
                      runs[0].generation.system_fingerprint if runs else None)


async def run(plans: list[ChoicePlan], *, streaming: bool) -> AsyncGenerator[Event, None]:
    """The events of `plans` (one request's choices, of all its prompts, all of one model)."""
    if not plans:
        return
    policy = RecoveryPolicy(plans[0].served, streaming=streaming)
    runs = [ChoiceRun(plan.index, new_generation(plan.served, plan.request)) for plan in plans]
    try:
        async with aclosing(_choices(runs, policy)) as events:
            async for event in events:
                yield event
    except UpstreamError as error:
        yield ErrorEvent(upstream_failure(error))
        return
    yield usage(runs)
