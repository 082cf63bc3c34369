"""One generation, whatever the method: pieces through the stop filter, then the finish reason.

The method's row in `nudging_core.methods.METHODS` names its generator of pieces; here they
pass the stop strings and become the pieces the client may see.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from nudging_core.calls import RoleCaller
from nudging_core.methods import METHODS, Method, MethodInput
from nudging_core.nudging import NudgingParams
from nudging_core.stopping import Budget, StopFilter
from nudging_core.types import (
    FinishReason,
    GenerationStats,
    Piece,
    Role,
    SamplingParams,
    StopReason,
    written_logprobs,
)
from nudging_core.upstream import ContextFull, ContextOverflow, Upstream

LENGTH_REASONS: frozenset[StopReason] = frozenset({"length", "context_length"})
# Counting the prompt (the base upstream's /tokenize) runs beside the answer; a stalled one may
# hold the end of the answer this long at most, then `prompt_tokens` is the upstream's own count.
PROMPT_COUNT_WAIT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    method: Method
    max_tokens: int
    base_prompt: str = ""
    nudging_prompt: str = ""
    # The client's token-id prompt, which a passthrough sends in place of its prompt text.
    prompt_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    params: NudgingParams = NudgingParams()
    # Among the choices of its prompt (seeds derive from it; choice 0 measures the prompt).
    choice_index: int = 0
    # Fields a passthrough method forwards to its upstream unchanged.
    passthrough_fields: dict[str, Any] = field(default_factory=dict)
    # The client asked for logprobs: a passthrough keeps the upstream's on its pieces, a
    # nudged model builds them from the tokens that wrote each piece.
    return_logprobs: bool = False
    # With `return_logprobs`, the alternatives per position the client asked for.
    top_logprobs: int = 0


async def _result_within(task: asyncio.Task[int | None], seconds: float) -> int | None:
    """`task`'s result if it comes within `seconds`, else None (the caller cancels it)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return task.result() if done else None


class Generation:
    """Runs one generation; after `pieces()` ends, `finish_reason` and `stats` are final."""

    def __init__(self, request: GenerationRequest, clients: Mapping[Role, Upstream]) -> None:
        self.request = request
        self.stats = GenerationStats()
        for role in clients:
            self.stats.track(role)
        self._clients = clients
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.finish_reason: FinishReason = "stop"
        self._input: MethodInput | None = None
        self._matched_stop: str | None = None

    def _caller(self, role: Role) -> RoleCaller:
        request = self.request
        return RoleCaller(
            self._clients[role], role, self.stats, request.sampling, request.choice_index,
            top_k=self._top_k(role),
        )

    def _top_k(self, role: Role) -> int:
        """What nudging asks each upstream for: the base's top-1 decides, and a client's
        logprobs come from each token's own model, so each gets the client's k (the base
        at least 1)."""
        if not self.request.return_logprobs:
            return 1
        k = self.request.top_logprobs
        return max(1, k) if role == "base" else k

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        method = METHODS[self.request.method]
        prompt_role = method.prompt_role
        counting = None
        # All choices of a prompt share it; the first one measures it.
        if not method.reports_prompt_tokens and self.request.choice_index == 0:
            counting = asyncio.create_task(self._clients["base"].count_tokens(self.request.base_prompt))
        try:
            async for piece in self._filtered_pieces():
                yield piece
            counted = None if counting is None else await _result_within(counting, PROMPT_COUNT_WAIT_SECONDS)
        finally:
            if counting is not None:
                counting.cancel()
        reported = self.stats.prompt_tokens.get(prompt_role)
        self.prompt_tokens = counted if counted is not None else reported or 0

    @property
    def stop_reason(self) -> str | int | None:
        """vLLM's `stop_reason`: the stop string that ended the answer (a passthrough's
        upstream may also name a stop token id)."""
        if self._input is not None and METHODS[self.request.method].forwards_fields:
            return self._input.upstream_stop_reason
        return self._matched_stop

    @property
    def system_fingerprint(self) -> str | None:
        """A passthrough's upstream's `system_fingerprint`."""
        return self._input.system_fingerprint if self._input is not None else None

    async def _filtered_pieces(self) -> AsyncGenerator[Piece, None]:
        # A passthrough's upstream applies the stop strings it was sent, and its answer passes
        # as it sent it: with `echo`, its text starts with the prompt, which may hold them.
        forwards = METHODS[self.request.method].forwards_fields
        stop_filter = StopFilter(() if forwards else self.request.stop,
                                 whole_tokens=self.request.return_logprobs)
        produced = False
        written = 0  # characters of text the client has been sent
        try:
            async with aclosing(self._method_pieces()) as pieces:
                async for piece in pieces:
                    produced = True
                    for visible in stop_filter.feed(piece):
                        self.completion_tokens += visible.num_tokens
                        yield self._with_logprobs(visible, written)
                        written += len(visible.text)
                    if stop_filter.matched is not None:
                        self.stats.stop_reason = "stop_string"
                        self._matched_stop = stop_filter.matched
                        break
        except ContextOverflow as overflow:
            if not produced and not isinstance(overflow, ContextFull):
                raise  # the prompt itself does not fit: the client's request is at fault
            self.stats.stop_reason = "context_length"
        for visible in stop_filter.flush():
            self.completion_tokens += visible.num_tokens
            yield self._with_logprobs(visible, written)
            written += len(visible.text)
        upstream_count = self._input.upstream_completion_tokens if self._input is not None else None
        if upstream_count is not None and stop_filter.matched is None:
            # A passthrough's upstream counts its own answer (with `echo`, the text also
            # holds the prompt).
            self.completion_tokens = upstream_count
        self.finish_reason = "length" if self.stats.stop_reason in LENGTH_REASONS else "stop"

    def _with_logprobs(self, piece: Piece, offset: int) -> Piece:
        """A nudged piece the client sees, with the logprobs of the tokens that wrote it (in
        the completions shape; `offset`: where its text starts in the answer)."""
        if not self.request.return_logprobs or not piece.written:
            return piece
        return dataclasses.replace(piece, logprobs=written_logprobs(piece, offset, self.request.top_logprobs))

    def _method_pieces(self) -> AsyncGenerator[Piece, None]:
        request = self.request
        self._input = MethodInput(
            callers={role: self._caller(role) for role in self._clients},
            base_prompt=request.base_prompt,
            nudging_prompt=request.nudging_prompt,
            prompt_token_ids=request.prompt_token_ids,
            params=request.params,
            budget=Budget(request.max_tokens),
            stats=self.stats,
            stop=request.stop,
            passthrough_fields=request.passthrough_fields,
            return_logprobs=request.return_logprobs and METHODS[request.method].forwards_fields,
        )
        return METHODS[request.method].generator(self._input)
