"""What the simulator adds to the shared completions protocol: its wording and its prompts."""

from __future__ import annotations

from ..openai_api import ApiError, CompletionRequest, Dialect

# The simulator's errors never named a field (``param`` is null) and it serves prompt logprobs.
SIMULATOR = Dialect(
    owned_by="nudging-proxy-simulator",
    internal_error="internal simulator error",
    one_sample_only="the simulator supports n=1 and best_of=1 only",
    names_params=False,
    serves_prompt_logprobs=True,
)


class SimulatorRequest(CompletionRequest[str | list[str] | list[int] | list[list[int]]]):
    """Token-id prompts pass validation so that their refusal can say to send text instead."""

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError("the simulator serves one prompt per request; "
                               f"got a list of {len(prompt)} prompts")
            return str(prompt[0])
        if not prompt:
            raise ApiError("prompt must not be an empty list")
        raise ApiError("token id prompts are not supported by the simulator; send text")
