"""The passthrough methods (`base_only`, `nudging_only`): one upstream writes the answer, with the
client's forwarded fields, and its events pass whole, as it sent them."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from nudging_core.types import Piece, Source, StopReason

if TYPE_CHECKING:
    from nudging_core.methods import MethodInput

UPSTREAM_STOP: dict[Source, StopReason] = {"base": "base_stop", "nudging": "nudging_stop"}


async def passthrough(run: MethodInput, role: Source) -> AsyncGenerator[Piece, None]:
    caller = run.callers[role]
    budget = run.budget
    prompt: str | list[int] = run.base_prompt if role == "base" else run.nudging_prompt
    if run.prompt_token_ids is not None:
        prompt = list(run.prompt_token_ids)  # vLLM reads them as they came
    call = caller.call(
        prompt,
        budget.max_tokens,
        round_index=0,
        logprobs=None,
        stop=run.stop,
        extra=run.passthrough_fields,
        seed_as_sent=True,
    )
    echo = bool(run.passthrough_fields.get("echo"))
    counted = 0
    async with caller.stream_call(call) as stream:
        # The upstream holds the same budget, so its events pass whole, as it sent them
        # (with `echo`, the first also holds the prompt); reading to the end gets its usage,
        # unless the upstream writes past the budget.
        async for reply in stream.replies():
            # (Dialects without the raw text, llama-server's, give it by tokens.)
            text = reply.text or "".join(token.text for token in reply.tokens)
            if not text and not reply.tokens:
                continue
            if budget.exhausted and not echo:
                # Text past the budget: the upstream ignores `max_tokens` (or never ends).
                # Leaving closes its request; events without text (the finish, the usage) are
                # still read above.
                break
            ends, end = [], 0
            for token in reply.tokens:
                end = min(end + len(token.text), len(text))
                ends.append(end)
            if ends:
                ends[-1] = len(text)
            piece = Piece(text, role, tuple(ends) or (len(text),),
                          reply.logprobs if run.return_logprobs else None)
            if not echo:
                piece = budget.take(piece)  # whole, unless the upstream overshoots
            if piece.text or piece.num_tokens:
                counted += piece.num_tokens
                yield piece
        finish_reason = stream.finish_reason
        reported = stream.completion_tokens
        run.upstream_stop_reason = stream.stop_reason
        run.system_fingerprint = stream.system_fingerprint
    if echo:
        # The echoed prompt's tokens are no part of the answer: the upstream's count is.
        run.upstream_completion_tokens = reported
    elif reported is not None and reported > counted and not budget.exhausted:
        # Tokens that wrote no text (an end-of-sequence token, say) count as the upstream
        # counts them.
        yield Piece("", role, (0,) * min(reported - counted, budget.remaining))
    if finish_reason != "stop":
        run.stats.stop_reason = "length"
    elif isinstance(run.upstream_stop_reason, str):
        run.stats.stop_reason = "stop_string"
    else:
        run.stats.stop_reason = UPSTREAM_STOP[role]
