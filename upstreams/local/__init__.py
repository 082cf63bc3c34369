"""A local upstream: a GGUF model served by llama.cpp behind vLLM's completions API subset.

``engine`` wraps the model (evaluation with KV-cache prefix reuse, numpy sampling and
logprobs), ``worker`` runs generations one at a time on a dedicated thread, ``app`` is the
FastAPI server, ``cli`` the command line (importable without numpy), ``weights`` finds
the GGUF files of the ``demo`` extra.
llama-cpp-python is needed only for the engine, so this package imports it lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_arguments": "cli",
    "create_app": "app",
    "run": "cli",
    "serve": "app",
    "LlamaCppModel": "engine",
    "Sampling": "generation",
    "generate": "generation",
    "MissingModelError": "weights",
    "gemma_path": "weights",
    "smollm_path": "weights",
}
__all__ = ["LlamaCppModel", "MissingModelError", "Sampling", "add_arguments", "create_app",
           "gemma_path", "generate", "run", "serve", "smollm_path"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
