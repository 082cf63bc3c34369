"""From a validated request to running generations: one per choice, concurrently."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.types import Piece, SamplingParams
from nudging_core.upstream import ContextOverflow, UpstreamError
from nudging_core.upstream.errors import is_retryable

from .config import COMBINED_METHODS
from .errors import invalid_request, scrub_urls
from .prompts import Prompts
from .protocol import ChatCompletionRequest, CompletionRequest, unsupported_fields
from .registry import ServedModel

AnyRequest = CompletionRequest | ChatCompletionRequest
# Fields the proxy itself interprets; everything else a passthrough method forwards.
OWN_FIELDS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
     "stop", "stream", "stream_options", "seed", "user", "nudging"}
)


def _max_tokens(served: ServedModel, request: AnyRequest) -> int:
    field_name, requested = "max_tokens", request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        field_name, requested = "max_completion_tokens", request.max_completion_tokens
    if requested is None:
        return served.config.default_max_tokens
    limit = served.config.max_tokens_limit
    if requested > limit:
        raise invalid_request(f"{field_name} must be at most {limit} for this model", field_name)
    return requested


def _stops(request: AnyRequest) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)


def _nudging_params(served: ServedModel, request: AnyRequest) -> NudgingParams:
    config = served.config
    options = request.nudging
    return NudgingParams(
        threshold=options.threshold if options and options.threshold is not None else config.threshold,
        lookahead_tokens=(
            options.lookahead_tokens if options and options.lookahead_tokens is not None
            else config.lookahead_tokens
        ),
        chunk_tokens=config.chunk_tokens,
        probe_window=config.probe_window,
        max_rounds=config.max_rounds,
        strategy=options.strategy if options and options.strategy is not None else config.strategy,
        cleanup=options.cleanup if options and options.cleanup is not None else config.cleanup,
    )


def _passthrough_fields(request: AnyRequest) -> dict[str, Any]:
    dumped = request.model_dump(exclude_unset=True, exclude_none=True)
    fields = {key: value for key, value in dumped.items() if key not in OWN_FIELDS}
    if isinstance(request, ChatCompletionRequest):
        # The upstream writes the chat as a completion: chat's `logprobs: true` with
        # `top_logprobs: k` is the completions API's `logprobs: k`.
        fields.pop("top_logprobs", None)
        fields.pop("logprobs", None)
        if request.logprobs:
            fields["logprobs"] = request.top_logprobs or 0
    return fields


def wants_logprobs(request: AnyRequest) -> bool:
    if isinstance(request, ChatCompletionRequest):
        return request.logprobs
    return request.logprobs is not None


def generation_requests(
    served: ServedModel, request: AnyRequest, prompts: Prompts
) -> list[GenerationRequest]:
    method = served.config.method
    combined = method in COMBINED_METHODS
    if combined:
        unsupported = unsupported_fields(request)
        if unsupported:
            raise invalid_request(
                f"{unsupported[0]} is not supported for models of method {method!r}", unsupported[0]
            )
    sampling = SamplingParams(
        temperature=request.temperature if request.temperature is not None else served.config.temperature,
        top_p=request.top_p if request.top_p is not None else served.config.top_p,
        seed=request.seed,
    )
    common = dict(
        method=method,
        max_tokens=_max_tokens(served, request),
        base_prompt=prompts.base,
        nudging_prompt=prompts.nudging,
        stop=_stops(request),
        sampling=sampling,
        params=_nudging_params(served, request),
        passthrough_fields={} if combined else _passthrough_fields(request),
        return_logprobs=not combined and wants_logprobs(request),
    )
    return [GenerationRequest(choice_index=index, **common) for index in range(request.n)]  # type: ignore[arg-type]


@dataclass(slots=True)
class ChoiceRun:
    """A generation and the pieces it sent, for the response body and its extension."""

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
        run.restart(new_generation(self.served, dataclasses.replace(
            request, method="base_only", passthrough_fields={})))
        run.fallback_reason = scrub_urls(str(error))
        return True

    def _restartable(self, run: ChoiceRun) -> bool:
        return not (self.streaming and any(piece.text for piece in run.pieces))


@dataclass(frozen=True, slots=True)
class PieceEvent:
    run: ChoiceRun
    piece: Piece | None  # None: this choice has finished


def new_generation(served: ServedModel, request: GenerationRequest) -> Generation:
    """A generation on the replicas the model picks now (so a retry may land on another)."""
    return Generation(request, served.pick_clients())


def make_runs(served: ServedModel, requests: list[GenerationRequest]) -> list[ChoiceRun]:
    return [ChoiceRun(r.choice_index, new_generation(served, r)) for r in requests]


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


async def run_choices(runs: list[ChoiceRun], policy: RecoveryPolicy) -> AsyncGenerator[PieceEvent, None]:
    """Pieces of all choices as they come; an error in one cancels the others."""
    if len(runs) == 1:
        run = runs[0]
        async with aclosing(_choice_pieces(run, policy)) as pieces:
            async for piece in pieces:
                yield PieceEvent(run, piece)
        yield PieceEvent(run, None)
        return
    queue: asyncio.Queue[PieceEvent | BaseException] = asyncio.Queue()

    async def produce(run: ChoiceRun) -> None:
        try:
            async with aclosing(_choice_pieces(run, policy)) as pieces:
                async for piece in pieces:
                    await queue.put(PieceEvent(run, piece))
            await queue.put(PieceEvent(run, None))
        except Exception as error:  # handed to the consumer, which re-raises it
            await queue.put(error)

    tasks = [asyncio.create_task(produce(run)) for run in runs]
    try:
        finished = 0
        while finished < len(runs):
            event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            finished += event.piece is None
            yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
