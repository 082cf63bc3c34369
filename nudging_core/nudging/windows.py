"""Step 7 on a streamed continuation: `paper`'s chunk rules, judged on windows of the stream.

`paper` reads the base's continuation in chunks (the probe's tokens 1..C-1, then C new tokens
each) and judges every whole chunk (`rules.judge_chunk`). `fast` reads one stream and judges
the same windows of it, so it makes the same decisions, while sending tokens as they come
wherever no rule can still drop them:

- Both dropping guards need the window's text to occur in the output as it was at the
  window's start ((a): in this round's base text, a part of that output; (c): in the output),
  and once the text of a window so far does not occur there, no longer text of it does. So
  a window's tokens are held back only while its text so far occurs there; when it stops
  occurring, the held tokens are sent and the rest of the window streams on.
- A window still held at its end, or where the base stops, is judged whole, as `paper` does.
- An uncertain token ends the continuation. While holding: if the text up to it is not in
  this round's base text, (a) cannot fire, so the window is judged now; otherwise the window
  is read to its end, since (a) looks at the whole chunk.
- A window that ends inside a split character (tokens with no text, see
  `Completion.written_tokens`) leaves those tokens to the next window, as `paper`'s next
  chunk writes them again.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from nudging_core.types import Piece, Token

from .algorithm import apply_verdict
from .context import NudgingContext
from .rules import ChunkVerdict, judge_chunk

# The next token of the base's stream (None: the base stopped), given the tokens held back
# (a restarted stream continues after them) and how many the window still lacks.
NextToken = Callable[[list[Token], int], Awaitable[Token | None]]


@dataclass(slots=True)
class _Window:
    """One window of the stream: the paper's chunk at the same place."""

    size: int
    output: str  # the output at the window's start
    base_text: str  # this round's base text at the window's start
    read: int = 0
    held: list[Token] = field(default_factory=list)
    held_at: list[int] = field(default_factory=list)  # when each held token was read
    holding: bool = True

    @property
    def rest(self) -> int:
        return self.size - self.read

    @property
    def held_text(self) -> str:
        return "".join(token.text for token in self.held)

    def hold(self, token: Token) -> None:
        self.held.append(token)
        self.held_at.append(self.read)
        self.read += 1

    def let_go(self, context: NudgingContext) -> list[Token]:
        """Stop holding: the held tokens, counted in the stats by how long each waited."""
        waits = [self.read - 1 - at for at in self.held_at]
        context.stats.held_tokens += sum(wait > 0 for wait in waits)
        context.stats.held_token_delay += sum(waits)
        held, self.held, self.held_at, self.holding = self.held, [], [], False
        return held


async def continue_streamed(
    context: NudgingContext, first: Token, next_token: NextToken
) -> AsyncGenerator[Piece, None]:
    """Step 7 on a stream: the probe's first token, then window after window."""
    stats, threshold = context.stats, context.params.threshold
    piece = context.accept_tokens([first])
    yield piece
    base_text = piece.text
    window_size = context.params.chunk_tokens - 1
    windows = 0
    carried = 0  # tokens with no text that end the last window and start this one
    while not context.budget.exhausted:
        window = _Window(window_size, context.output, base_text, read=carried)
        verdict: ChunkVerdict | None = None
        stopped = False
        textless = 0  # the window's last tokens that have no text
        while window.rest > 0:
            token = await next_token(window.held, window.rest)
            if token is None:
                stopped = True
                break
            textless = 0 if token.text else textless + 1
            if not window.holding:
                window.read += 1
                if token.top_prob < threshold:
                    context.base_uncertain(token)
                    return
                piece = context.accept_tokens([token])
                base_text += piece.text
                yield piece
                if context.budget.exhausted:
                    break
                continue
            window.hold(token)
            if token.top_prob < threshold:
                if window.held_text in window.base_text:
                    # (a) may still drop the window: it needs the whole of it.
                    while window.rest > 0 and (token := await next_token(window.held, window.rest)):
                        window.hold(token)
                verdict = judge_chunk(window.let_go(context), window.base_text, window.output, threshold)
                break
            if window.held_text not in window.output:
                piece = context.accept_tokens(window.let_go(context))
                base_text += piece.text
                yield piece
                if context.budget.exhausted:
                    break
        if window.holding:
            verdict = judge_chunk(window.let_go(context), window.base_text, window.output, threshold)
        if verdict is not None:
            decided = apply_verdict(context, verdict)
            if decided is None:
                return
            base_text += decided.text
            yield decided
            if verdict.ends is not None:
                return
        if stopped:
            # Paper never looks at the probe's finish: after a stop in the first window it
            # asks for one more chunk and finds it empty.
            stats.fire("chunk_empty" if windows == 0 else "base_stop")
            return
        windows += 1
        window_size = context.params.chunk_tokens
        carried = textless if textless < window_size else 0
    stats.fire("budget_in_continuation")
