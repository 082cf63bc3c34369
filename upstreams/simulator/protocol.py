"""What the simulator adds to the shared completions protocol: its wording and its prompts."""

from __future__ import annotations

from typing import cast

from ..openai_api import ApiError, CompletionRequest, ServerWording
from .tokenizer import token_text

# The simulator's errors never named a field (``param`` is null) and it serves prompt logprobs.
SIMULATOR = ServerWording(
    owned_by="nudging-proxy-simulator",
    internal_error="internal simulator error",
    one_sample_only="the simulator supports n=1 and best_of=1 only",
    names_params=False,
    serves_prompt_logprobs=True,
)


class SimulatorRequest(CompletionRequest[str | list[str] | list[int] | list[list[int]]]):
    """One prompt per request: text, or token ids read as the text they stand for."""

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise ApiError("prompt must not be an empty list")
        is_ids = isinstance(prompt[0], int)  # one prompt of token ids
        if not is_ids and len(prompt) != 1:
            raise ApiError("the simulator serves one prompt per request; "
                           f"got a list of {len(prompt)} prompts")
        one = prompt if is_ids else prompt[0]
        return one if isinstance(one, str) else ids_text(cast(list[int], one))


def ids_text(tokens: list[int]) -> str:
    """The text of token ids, as `/detokenize` gives it; an unknown id is a 400."""
    texts = [token_text(token) for token in tokens]
    for token, text in zip(tokens, texts, strict=True):
        if text is None:
            raise ApiError(f"token id {token} is out of vocabulary")
    return "".join(text or "" for text in texts)
