"""Requests to the prompts each role sees (DESIGN 4)."""

from __future__ import annotations

from dataclasses import dataclass

from nudging_core.templates import Message, TemplateError, base_prompt, normalize_messages
from nudging_core.upstream import NoChatTemplate, UpstreamError

from .errors import invalid_request, no_chat_template, upstream_failure, upstream_unavailable
from .protocol import ChatCompletionRequest, CompletionRequest
from .registry import ServedModel


@dataclass(frozen=True, slots=True)
class Prompts:
    base: str
    nudging: str


async def _rendered_by_upstream(served: ServedModel, messages: list[Message]) -> str:
    client = served.replicas["nudging"].pick()
    try:
        rendered = await client.render_chat([{"role": m.role, "content": m.content} for m in messages])
    except NoChatTemplate as error:
        raise no_chat_template(served.config.name, error) from None
    except UpstreamError as error:
        raise upstream_failure(error) from None
    if rendered is None:
        message = "the upstream cannot render its chat template; configure chat_template"
        raise upstream_unavailable("nudging", message, status_code=502)
    return rendered + served.config.answer_start


async def _nudger_prompt(served: ServedModel, messages: list[Message]) -> str:
    if served.uses_upstream_template:
        return await _rendered_by_upstream(served, messages)
    if served.chat_template is None:
        # A passthrough base_only model never reads the nudger prompt.
        return ""
    try:
        return served.chat_template.render(messages, served.config.answer_start)
    except TemplateError as error:
        raise invalid_request(str(error), "messages") from None


async def chat_prompts(served: ServedModel, request: ChatCompletionRequest) -> Prompts:
    config = served.config
    try:
        messages = normalize_messages(request.messages)
        base = base_prompt(
            messages, default_system=config.default_system_prompt, answer_start=config.answer_start
        )
    except TemplateError as error:
        raise invalid_request(str(error), "messages") from None
    if config.default_system_prompt and not any(m.role == "system" for m in messages):
        messages = [Message("system", config.default_system_prompt), *messages]
    return Prompts(base, await _nudger_prompt(served, messages))


async def completion_prompts(served: ServedModel, request: CompletionRequest) -> Prompts:
    prompt = request.single_prompt()
    options = request.nudging
    if options is not None and options.nudging_prompt is not None:
        return Prompts(prompt, options.nudging_prompt)
    if served.config.wrap_completion_prompt:
        return Prompts(prompt, await _nudger_prompt(served, [Message("user", prompt)]))
    return Prompts(prompt, prompt)
