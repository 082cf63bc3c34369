"""Rendering a GGUF model's own chat template, as HF tokenizers (and so vLLM) render it.

The proxy's ``auto`` template mode asks the upstream to render chat messages (vLLM's
``/tokenize`` with ``messages``, then ``/detokenize``). Here the template is the GGUF's
``tokenizer.chat_template`` metadata, run in the proxy's own HF-style environment
(``nudging_core.templates.hf_jinja_environment``: jinja2's immutable sandbox, trimmed blocks,
``raise_exception``, a ``tojson`` that does not HTML-escape) with the model's BOS/EOS token
strings.
"""

from __future__ import annotations

from typing import Any

import jinja2

from nudging_core.templates import hf_jinja_environment

from ..openai_api import ApiError

TEXT_PART_SEPARATOR = "\n"  # vLLM joins text parts this way for string-content templates


def _message(raw: dict[str, Any]) -> dict[str, Any]:
    """A message as string-content templates expect it: text parts joined into one string."""
    role = raw.get("role")
    if not isinstance(role, str):
        raise ApiError("each message needs a string 'role'", param="messages")
    content = raw.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError("only text content parts are supported", param="messages")
            texts.append(str(part.get("text", "")))
        content = TEXT_PART_SEPARATOR.join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise ApiError("message content must be a string or a list of text parts",
                       param="messages")
    return {**raw, "content": content}


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        try:
            self._template = hf_jinja_environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"the model's chat template does not parse: {error}") from error
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        variables = dict(extra or {})
        variables.update(messages=[_message(m) for m in messages],
                         add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self._template.render(**variables)
        except Exception as error:  # noqa: BLE001 - any failure of the template is the request's
            # The template's own checks (raise_exception: "roles must alternate", ...) and
            # its failures on unexpected input are the request's fault.
            raise ApiError(f"the chat template could not render these messages: {error}",
                           param="messages") from None
