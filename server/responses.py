"""Response bodies and stream chunks in the OpenAI shapes, plus the `nudging` extension."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nudging_core.provenance import merge_spans, nudging_word_ratio

from .runs import ChoiceRun


def provenance_report(run: ChoiceRun) -> dict[str, Any]:
    stats = run.generation.stats
    spans = merge_spans(run.pieces)
    tokens = {"base": 0, "nudging": 0}
    for piece in run.pieces:
        tokens[piece.source] += piece.num_tokens
    return {
        "spans": [{"text": span.text, "source": span.source} for span in spans],
        "tokens": tokens,
        "nudging_word_ratio": nudging_word_ratio(spans),
        "rounds": stats.rounds,
        "upstream_requests": dict(stats.upstream_requests),
        "stop_reason": stats.stop_reason,
    }


def usage(runs: list[ChoiceRun]) -> dict[str, int]:
    prompt_tokens = next((r.generation.prompt_tokens for r in runs if r.generation.prompt_tokens), 0)
    completion_tokens = sum(run.generation.completion_tokens for run in runs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(slots=True)
class Shape:
    """The wire shape of one endpoint's answers; `chat` picks chat.completion over text_completion."""

    chat: bool
    model: str
    with_provenance: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def _extension(self, choice: dict[str, Any], run: ChoiceRun) -> dict[str, Any]:
        if self.with_provenance:
            choice["nudging"] = provenance_report(run)
        return choice

    def body(self, runs: list[ChoiceRun]) -> dict[str, Any]:
        choices = []
        for run in runs:
            finish = run.generation.finish_reason
            if self.chat:
                choice = {"index": run.index, "message": {"role": "assistant", "content": run.text},
                          "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": run.index, "text": run.text, "logprobs": None, "finish_reason": finish}
            choices.append(self._extension(choice, run))
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(runs)
        return body

    def chunk(self, index: int, text: str, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        return self._envelope("text_completion", [choice])

    def final_chunk(self, run: ChoiceRun) -> dict[str, Any]:
        chunk = self.chunk(run.index, "")
        choice = chunk["choices"][0]
        if self.chat:
            choice["delta"] = {}
        choice["finish_reason"] = run.generation.finish_reason
        self._extension(choice, run)
        return chunk

    def usage_chunk(self, runs: list[ChoiceRun]) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        chunk["usage"] = usage(runs)
        return chunk
