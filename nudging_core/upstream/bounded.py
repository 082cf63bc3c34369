"""Reading an upstream's answer without buffering more of it than a cap allows.

httpx's `aread` and `aiter_lines` keep whatever the upstream sends until the body or line
ends: one endless line would hold the proxy's memory (and reach the client as one event).
These read chunk by chunk and stop as soon as the cap is passed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable


class OverLimit(Exception):
    """An answer, or one line of it, is longer than its cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"over {limit} bytes")
        self.limit = limit


async def read_bounded(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """All of `chunks`, unless they pass `limit` bytes: then OverLimit, at the chunk that does."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise OverLimit(limit)
    return bytes(body)


async def bounded_lines(chunks: AsyncIterable[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The lines of `chunks` without their `\\n` or `\\r\\n`, unless one passes `limit` bytes:
    then OverLimit, at the chunk that makes it so. (SSE also allows a lone `\\r` as a line
    end; the servers proxied here end lines with `\\n`.) The splitting is `bytes.find`, not a
    loop over bytes: this runs for every streamed token."""
    partial = bytearray()  # the start of a line that the next chunks continue
    async for chunk in chunks:
        start = 0
        end = chunk.find(b"\n")
        while end != -1:
            if len(partial) + end - start > limit:
                raise OverLimit(limit)
            if partial:
                partial += chunk[start:end]
                line = bytes(partial)
                partial.clear()
            else:
                line = chunk[start:end]
            yield line.removesuffix(b"\r")
            start = end + 1
            end = chunk.find(b"\n", start)
        partial += chunk[start:]
        if len(partial) > limit:
            raise OverLimit(limit)
    if partial:
        yield bytes(partial)
