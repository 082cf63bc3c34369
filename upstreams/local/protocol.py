"""What the local upstream adds to the shared completions protocol: its wording and its prompts."""

from __future__ import annotations

from ..openai_api import ApiError, CompletionRequest, ServerWording

# Errors name the field at fault, as vLLM's do. Prompt logprobs need the logits of every
# prompt position, which defeats the KV cache reuse this server is built around; so echo is
# served without them.
LOCAL = ServerWording(
    owned_by="nudging-proxy",
    internal_error="internal server error",
    one_sample_only="only n=1 and best_of=1 are supported",
    names_params=True,
    serves_prompt_logprobs=False,
)


class LocalRequest(CompletionRequest[str | list[str]]):
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(f"this server takes one prompt per request; got {len(self.prompt)}",
                           param="prompt")
        return self.prompt[0]
