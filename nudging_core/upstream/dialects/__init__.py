"""Upstream dialects: one small interface, one module per wire format."""

from __future__ import annotations

from typing import Any

from .base import Dialect, Parser, Reply, Request, Sender
from .llama_server import LlamaServer
from .openai import OpenAICompletions

# Servers speaking the OpenAI legacy completions shape share one dialect.
DIALECTS: dict[str, type[Dialect]] = {
    "vllm": OpenAICompletions,
    "sglang": OpenAICompletions,
    "llama-cpp-python": OpenAICompletions,
    "nudging-proxy": OpenAICompletions,
    "openai": OpenAICompletions,
    "llama-server": LlamaServer,
}
DIALECT_NAMES = ("auto", *DIALECTS)


def detect(models_payload: Any) -> Dialect:
    """Guess the dialect from a `/v1/models` answer (llama-server owns its models as `llamacpp`)."""
    cards = models_payload.get("data", []) if isinstance(models_payload, dict) else []
    owners = {card.get("owned_by") for card in cards if isinstance(card, dict)}
    return LlamaServer() if "llamacpp" in owners else OpenAICompletions()


__all__ = ["DIALECTS", "DIALECT_NAMES", "Dialect", "Parser", "Reply", "Request", "Sender", "detect"]
