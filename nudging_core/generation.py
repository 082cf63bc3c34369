"""One generation, whatever the method: pieces through the stop filter, then the finish reason.

This is the core's single entry point for the server: method -> generator of pieces ->
stop strings -> pieces the client may see.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from nudging_core.baselines import BaselineContext, generate_baseline
from nudging_core.calls import RoleCaller
from nudging_core.nudging import NudgingContext, NudgingParams, nudge
from nudging_core.stopping import Budget, StopFilter
from nudging_core.types import FinishReason, GenerationStats, Piece, Role, SamplingParams, Source, StopReason
from nudging_core.upstream import ContextFull, ContextOverflow, UpstreamClient

Method = Literal["nudging", "base_only", "nudging_only", "proxy_tuning", "ensemble"]
PASSTHROUGH_ROLE: dict[str, Source] = {"base_only": "base", "nudging_only": "nudging"}
UPSTREAM_STOP: dict[Source, StopReason] = {"base": "base_stop", "nudging": "nudging_stop"}
LENGTH_REASONS: frozenset[StopReason] = frozenset({"length", "context_length"})


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    method: Method
    max_tokens: int
    base_prompt: str = ""
    nudging_prompt: str = ""
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    params: NudgingParams = NudgingParams()
    choice_index: int = 0
    # Fields a passthrough method forwards to its upstream unchanged.
    passthrough_fields: dict[str, Any] = field(default_factory=dict)
    # A passthrough method keeps the upstream's logprobs on its pieces.
    return_logprobs: bool = False


class Generation:
    """Runs one generation; after `pieces()` ends, `finish_reason` and `stats` are final."""

    def __init__(self, request: GenerationRequest, clients: dict[Role, UpstreamClient]) -> None:
        self.request = request
        self.stats = GenerationStats()
        for role in clients:
            self.stats.track(role)
        self._clients = clients
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.finish_reason: FinishReason = "stop"
        self._upstream_completion_tokens: int | None = None

    def _caller(self, role: Role) -> RoleCaller:
        return RoleCaller(
            self._clients[role], role, self.stats, self.request.sampling, self.request.choice_index
        )

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        prompt_role: Source = "nudging" if self.request.method == "nudging_only" else "base"
        counting = None
        # All choices of a request share the prompt; the first one measures it.
        if self.request.method == "nudging" and self.request.choice_index == 0:
            # Every base call of nudging extends the prompt, so none reports its bare size.
            counting = asyncio.create_task(self._clients["base"].count_tokens(self.request.base_prompt))
        try:
            async for piece in self._filtered_pieces():
                yield piece
            counted = await counting if counting is not None else None
        finally:
            if counting is not None:
                counting.cancel()
        reported = self.stats.prompt_tokens.get(prompt_role)
        self.prompt_tokens = counted if counted is not None else reported or 0

    async def _filtered_pieces(self) -> AsyncGenerator[Piece, None]:
        stop_filter = StopFilter(self.request.stop)
        produced = False
        try:
            async with aclosing(self._method_pieces()) as pieces:
                async for piece in pieces:
                    produced = True
                    for visible in stop_filter.feed(piece):
                        self.completion_tokens += visible.num_tokens
                        yield visible
                    if stop_filter.matched is not None:
                        self.stats.stop_reason = "stop_string"
                        break
        except ContextOverflow as overflow:
            if not produced and not isinstance(overflow, ContextFull):
                raise  # the prompt itself does not fit: the client's request is at fault
            self.stats.stop_reason = "context_length"
        for visible in stop_filter.flush():
            self.completion_tokens += visible.num_tokens
            yield visible
        if self._upstream_completion_tokens is not None and stop_filter.matched is None:
            # A passthrough's upstream counts its own answer (with `echo`, the text also
            # holds the prompt).
            self.completion_tokens = self._upstream_completion_tokens
        self.finish_reason = "length" if self.stats.stop_reason in LENGTH_REASONS else "stop"

    def _method_pieces(self) -> AsyncGenerator[Piece, None]:
        request = self.request
        budget = Budget(request.max_tokens)
        if request.method == "nudging":
            context = NudgingContext(
                base=self._caller("base"),
                nudger=self._caller("nudging"),
                base_prompt=request.base_prompt,
                nudging_prompt=request.nudging_prompt,
                params=request.params,
                budget=budget,
                stats=self.stats,
            )
            return nudge(context)
        if request.method in ("proxy_tuning", "ensemble"):
            return generate_baseline(BaselineContext(
                method=request.method,
                callers={role: self._caller(role) for role in self._clients},
                base_prompt=request.base_prompt,
                nudging_prompt=request.nudging_prompt,
                chunk_tokens=request.params.chunk_tokens,
                budget=budget,
                stats=self.stats,
            ))
        role = PASSTHROUGH_ROLE[request.method]
        prompt = request.base_prompt if role == "base" else request.nudging_prompt
        return self._passthrough(role, prompt, budget)

    async def _passthrough(self, role: Source, prompt: str, budget: Budget) -> AsyncGenerator[Piece, None]:
        request = self.request
        caller = self._caller(role)
        call = caller.call(
            prompt,
            request.max_tokens,
            round_index=0,
            logprobs=None,
            stop=request.stop,
            extra=request.passthrough_fields,
            seed_as_sent=True,
        )
        echo = bool(request.passthrough_fields.get("echo"))
        counted = 0
        async with caller.stream_call(call) as stream:
            # The upstream holds the same budget, so its events pass whole, as it sent them
            # (with `echo`, the first also holds the prompt); reading to the end gets its usage.
            async for reply in stream.replies():
                # (Dialects without the raw text, llama-server's, give it by tokens.)
                text = reply.text or "".join(token.text for token in reply.tokens)
                if not text and not reply.tokens:
                    continue
                ends, end = [], 0
                for token in reply.tokens:
                    end = min(end + len(token.text), len(text))
                    ends.append(end)
                if ends:
                    ends[-1] = len(text)
                piece = Piece(text, role, tuple(ends) or (len(text),),
                              reply.logprobs if request.return_logprobs else None)
                if not echo:
                    piece = budget.take(piece)  # whole, unless the upstream overshoots
                if piece.text or piece.num_tokens:
                    counted += piece.num_tokens
                    yield piece
            finish_reason = stream.finish_reason
            reported = stream.completion_tokens
        if echo:
            # The echoed prompt's tokens are no part of the answer: the upstream's count is.
            self._upstream_completion_tokens = reported
        elif reported is not None and reported > counted and not budget.exhausted:
            # Tokens that wrote no text (an end-of-sequence token, say) count as the upstream
            # counts them.
            yield Piece("", role, (0,) * min(reported - counted, budget.remaining))
        self.stats.stop_reason = UPSTREAM_STOP[role] if finish_reason == "stop" else "length"
