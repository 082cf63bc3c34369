"""Response bodies and stream chunks in the OpenAI shapes, plus the `nudging` extension: a
`ChatShape` for /v1/chat/completions, a `TextShape` for /v1/completions."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nudging_core.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    NudgingChunkSource,
    NudgingReport,
    SpanReport,
    TokenSource,
    UsageInfo,
    new_chat_completion_id,
    new_completion_id,
)
from nudging_core.provenance import merge_spans, nudging_word_ratio, tokens_by_source
from nudging_core.service import ChoiceRun, UsageEvent
from nudging_core.types import Piece

COMPLETION_LOGPROB_KEYS = ("text_offset", "token_logprobs", "tokens", "top_logprobs")


def completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, list[Any]] | None:
    """The upstream's completions logprobs of several events, joined as one answer."""
    if not parts:
        return None
    joined: dict[str, list[Any]] = {key: [] for key in COMPLETION_LOGPROB_KEYS}
    for part in parts:
        size = len(part.get("tokens") or [])
        for key in COMPLETION_LOGPROB_KEYS:
            values = part.get(key)
            joined[key].extend(values if isinstance(values, list) else [None] * size)
    return joined


def chat_logprobs(parts: list[dict[str, Any]], top_k: int) -> dict[str, Any] | None:
    """Completions logprobs in the chat shape: per token its text, logprob, bytes and the
    `top_k` most likely tokens."""
    joined = completion_logprobs(parts)
    if joined is None:
        return None
    content = []
    for token, logprob, top in zip(joined["tokens"], joined["token_logprobs"], joined["top_logprobs"],
                                   strict=False):
        token = str(token)
        ranked = sorted((top or {}).items(), key=lambda item: -item[1])[:top_k]
        content.append({
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked],
        })
    return {"content": content}


def token_sources(pieces: list[Piece]) -> list[TokenSource] | None:
    """Per token of a nudged answer's logprobs, who wrote it (None: no such logprobs)."""
    if not any(piece.logprobs is not None and piece.written for piece in pieces):
        return None
    return [
        TokenSource(source=piece.source, base_top_prob=written.base_top_prob)
        for piece in pieces if piece.logprobs is not None
        for written in piece.written
    ]


def provenance_report(run: ChoiceRun) -> NudgingReport:
    stats = run.generation.stats
    spans = merge_spans(run.pieces)
    return NudgingReport(
        spans=[SpanReport(text=span.text, source=span.source) for span in spans],
        tokens=tokens_by_source(run.pieces),
        nudging_word_ratio=nudging_word_ratio(spans),
        rounds=stats.rounds,
        upstream_requests=dict(stats.upstream_requests),
        held_tokens=stats.held_tokens,
        stop_reason=stats.stop_reason,
        fallback="base_only" if run.fallback_reason is not None else None,
        fallback_reason=run.fallback_reason,
        token_sources=token_sources(run.pieces),
    )


def usage_info(usage: UsageEvent) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


@dataclass(slots=True)
class Shape(ABC):
    """The wire shape of one endpoint's answers."""

    chunk_object: ClassVar[str]

    model: str
    with_provenance: bool
    # A stream that ends with a usage chunk: every chunk before it says `"usage": null`.
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def report(self, run: ChoiceRun) -> NudgingReport | None:
        # A fallback is reported unasked: clients must be able to tell the answer is not nudged.
        return provenance_report(run) if self.with_provenance or run.fallback_reason is not None else None

    @abstractmethod
    def logprobs(self, pieces: list[Piece]) -> dict[str, Any] | None: ...

    @abstractmethod
    def body(self, runs: list[ChoiceRun], usage: UsageEvent) -> dict[str, Any]: ...

    def opening_chunks(self, indexes: list[int]) -> list[dict[str, Any]]:
        """The chunks a stream starts with, before any text."""
        return []

    @abstractmethod
    def chunk(
        self, index: int, text: str | None, *, finish_reason: str | None = None,
        report: NudgingReport | NudgingChunkSource | None = None, logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]: ...

    @abstractmethod
    def _stream_body(self, choices: list[Any], **usage: Any) -> dict[str, Any]:
        """A stream chunk with `choices` (and `usage` only when given: the key is left out
        of the other chunks)."""

    def _chunk_body(self, choices: list[Any]) -> dict[str, Any]:
        """A chunk before the usage chunk: OpenAI sends `"usage": null` there when the client
        asked for usage, and no `usage` key otherwise."""
        return self._stream_body(choices, usage=None) if self.include_usage else self._stream_body(choices)

    def usage_chunk(self, usage: UsageEvent) -> dict[str, Any]:
        return self._stream_body([], usage=usage_info(usage), system_fingerprint=usage.system_fingerprint)

    def text_chunk(self, index: int, piece: Piece) -> dict[str, Any]:
        """The chunk of one piece of text (with its upstream logprobs, if returned, and the
        model that wrote it, if provenance was asked for). Built as a plain dict rather than
        through the response models, as `chunk` builds the others: this runs for every streamed
        token (tests/test_protocol.py holds the two to the same shape)."""
        logprobs = self.logprobs([piece]) if piece.logprobs is not None else None
        source = (NudgingChunkSource(source=piece.source, token_sources=token_sources([piece])).model_dump()
                  if self.with_provenance else None)
        body = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [self._text_choice(index, piece.text, logprobs, source)]}
        if self.include_usage:
            body["usage"] = None
        return body

    @abstractmethod
    def _text_choice(self, index: int, text: str, logprobs: dict[str, Any] | None,
                     source: dict[str, Any] | None) -> dict[str, Any]: ...

    def final_chunk(self, run: ChoiceRun) -> dict[str, Any]:
        finish_reason = run.generation.finish_reason
        return self.chunk(run.index, None, finish_reason=finish_reason, report=self.report(run),
                          stop_reason=run.generation.stop_reason)


@dataclass(slots=True)
class ChatShape(Shape):
    """chat.completion and chat.completion.chunk."""

    chunk_object: ClassVar[str] = "chat.completion.chunk"

    # `top_logprobs` when passthrough logprobs are returned.
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self.id = new_chat_completion_id()

    def logprobs(self, pieces: list[Piece]) -> dict[str, Any] | None:
        return chat_logprobs([piece.logprobs for piece in pieces if piece.logprobs is not None],
                             self.top_logprobs)

    def body(self, runs: list[ChoiceRun], usage: UsageEvent) -> dict[str, Any]:
        choices = [
            ChatCompletionChoice(
                index=run.index,
                message=ChatCompletionMessage(content=run.text),
                logprobs=self.logprobs(run.pieces),
                finish_reason=run.generation.finish_reason,
                stop_reason=run.generation.stop_reason,
                nudging=self.report(run),
            )
            for run in runs
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_info(usage),
            system_fingerprint=usage.system_fingerprint,
        ).model_dump()

    def opening_chunks(self, indexes: list[int]) -> list[dict[str, Any]]:
        # Each choice's first chunk carries the role.
        return [self._chunk(index, "", role=True) for index in indexes]

    def chunk(
        self, index: int, text: str | None, *, finish_reason: str | None = None,
        report: NudgingReport | NudgingChunkSource | None = None, logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        return self._chunk(index, text, finish_reason=finish_reason, report=report, logprobs=logprobs,
                           stop_reason=stop_reason)

    def _chunk(
        self, index: int, text: str | None, *, role: bool = False, finish_reason: str | None = None,
        report: NudgingReport | NudgingChunkSource | None = None, logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        delta = DeltaMessage(role="assistant" if role else None, content=text)
        choice = ChatCompletionStreamChoice(
            index=index, delta=delta, finish_reason=finish_reason, nudging=report, logprobs=logprobs,
            **({"stop_reason": stop_reason} if finish_reason is not None else {}),
        )
        return self._chunk_body([choice])

    def _text_choice(self, index: int, text: str, logprobs: dict[str, Any] | None,
                     source: dict[str, Any] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": None}
        if source is not None:
            choice["nudging"] = source
        choice["delta"] = {"content": text}
        return choice

    def _stream_body(self, choices: list[Any], **usage: Any) -> dict[str, Any]:
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **usage
        ).model_dump()


@dataclass(slots=True)
class TextShape(Shape):
    """text_completion, whole and streamed."""

    chunk_object: ClassVar[str] = "text_completion"

    def __post_init__(self) -> None:
        self.id = new_completion_id()

    def logprobs(self, pieces: list[Piece]) -> dict[str, Any] | None:
        return completion_logprobs([piece.logprobs for piece in pieces if piece.logprobs is not None])

    def body(self, runs: list[ChoiceRun], usage: UsageEvent) -> dict[str, Any]:
        choices = [
            CompletionChoice(
                index=run.index, text=run.text, finish_reason=run.generation.finish_reason,
                stop_reason=run.generation.stop_reason, logprobs=self.logprobs(run.pieces),
                nudging=self.report(run),
            )
            for run in runs
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_info(usage),
            system_fingerprint=usage.system_fingerprint,
        ).model_dump()

    def chunk(
        self, index: int, text: str | None, *, finish_reason: str | None = None,
        report: NudgingReport | NudgingChunkSource | None = None, logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        choice = CompletionStreamChoice(
            index=index, text=text or "", finish_reason=finish_reason, nudging=report, logprobs=logprobs,
            stop_reason=stop_reason,
        )
        return self._chunk_body([choice])

    def _text_choice(self, index: int, text: str, logprobs: dict[str, Any] | None,
                     source: dict[str, Any] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": None,
                                  "stop_reason": None}
        if source is not None:
            choice["nudging"] = source
        choice["text"] = text
        return choice

    def _stream_body(self, choices: list[Any], **usage: Any) -> dict[str, Any]:
        return CompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **usage
        ).model_dump()
