"""A deterministic simulated language model behind vLLM's OpenAI-compatible completions API.

Three profiles share one tokenizer and one notion of a question: ``base`` (a large base model:
confident on content, unsure on style), ``aligned`` (a small chat model: confident, ends with
EOS) and ``aligned-base`` (the small model's base, for proxy tuning). See documents.py for what
they write and which question keywords trigger which behaviour, latency.py for timing, and
app.py for the server and the CLI hooks.
"""

from __future__ import annotations

import importlib
from typing import Any

# The web server (FastAPI) is imported only when asked for, so that using the model or the
# tokenizer stays cheap.
_EXPORTS = {
    "add_arguments": "app",
    "create_app": "app",
    "run": "app",
    "EOS": "documents",
    "PROFILES": "documents",
    "Features": "documents",
    "features_of": "documents",
    "LatencyModel": "latency",
    "Cursor": "model",
    "LanguageModel": "model",
    "count_tokens": "tokenizer",
    "tokenize": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
