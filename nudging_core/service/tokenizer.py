"""vLLM's tokenizer endpoints for a served model: `/tokenize`, `/detokenize`, `/tokenizer_info`.

The proxy has no tokenizer of its own: each is the model's base upstream's answer (the aligned
model's for `nudging_only`, which has no base), asked at that upstream's same endpoint with the
upstream's own model name. Clients such as lm-eval's remote tokenizer count, cut and decode
prompts with it, and the base model is the one that reads the prompt.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from nudging_core.errors import APIError, endpoint_not_served, upstream_failure
from nudging_core.registry import ServedModel
from nudging_core.types import Role
from nudging_core.upstream import UpstreamClient, UpstreamError

TokenizerEndpoint = Literal["tokenize", "detokenize", "tokenizer_info"]

# vLLM registers /tokenizer_info only when asked to.
_HINTS: Final[dict[TokenizerEndpoint, str]] = {
    "tokenizer_info": " (vLLM serves it with --enable-tokenizer-info-endpoint)",
}


def tokenizer_upstream(served: ServedModel) -> UpstreamClient:
    """The upstream whose tokenizer reads the model's prompts."""
    role: Role = "base" if "base" in served.replicas else "nudging"
    return served.replicas[role].pick()


def _failure(endpoint: TokenizerEndpoint, error: UpstreamError) -> APIError:
    if error.status_code in (404, 405):
        return endpoint_not_served(f"/{endpoint}", error, _HINTS.get(endpoint, ""))
    return upstream_failure(error)


async def ask_tokenizer(served: ServedModel, endpoint: TokenizerEndpoint, body: dict[str, Any] | None) -> Any:
    """The upstream's answer at `endpoint` to `body` (None: a GET); raises `APIError`."""
    client = tokenizer_upstream(served)
    forwarded = None if body is None else {**body, "model": client.model}
    try:
        return await client.forward(endpoint, forwarded)
    except UpstreamError as error:
        raise _failure(endpoint, error) from None
