"""Requests to the prompts each role sees (DESIGN 4), in two steps: `check_*` reads the request
and raises its 400s without any I/O; `render` then writes the nudger's prompt, which with
`chat_template: auto` asks the upstream (the only I/O of planning)."""

from __future__ import annotations

from dataclasses import dataclass

from nudging_core.errors import invalid_request, no_chat_template, upstream_failure, upstream_unavailable
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest
from nudging_core.registry import ServedModel
from nudging_core.templates import Message, TemplateError, base_prompt, normalize_messages
from nudging_core.upstream import NoChatTemplate, UpstreamError


@dataclass(frozen=True, slots=True)
class Prompts:
    base: str
    nudging: str


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """What `render` needs: the base prompt, and the nudger's prompt or the messages to render."""

    base: str
    nudging: str | None  # None: the upstream renders `messages` (chat_template: auto)
    messages: tuple[Message, ...] = ()


def _render_locally(served: ServedModel, messages: list[Message]) -> str | None:
    """The configured template's rendering (no I/O), or None when the upstream renders it."""
    if served.uses_upstream_template:
        return None
    if served.chat_template is None:
        # A passthrough base_only model never reads the nudger prompt.
        return ""
    try:
        return served.chat_template.render(messages, served.config.answer_start)
    except TemplateError as error:
        raise invalid_request(str(error), "messages") from None


def check_chat(served: ServedModel, request: ChatCompletionRequest) -> PromptPlan:
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
    return PromptPlan(base, _render_locally(served, messages), tuple(messages))


def check_completion(served: ServedModel, request: CompletionRequest) -> PromptPlan:
    prompt = request.single_prompt()
    options = request.nudging
    if options is not None and options.nudging_prompt is not None:
        return PromptPlan(prompt, options.nudging_prompt)
    if served.config.wrap_completion_prompt:
        messages = [Message("user", prompt)]
        return PromptPlan(prompt, _render_locally(served, messages), tuple(messages))
    return PromptPlan(prompt, prompt)


async def _rendered_by_upstream(served: ServedModel, messages: tuple[Message, ...]) -> str:
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


async def render(served: ServedModel, plan: PromptPlan) -> Prompts:
    if plan.nudging is not None:
        return Prompts(plan.base, plan.nudging)
    return Prompts(plan.base, await _rendered_by_upstream(served, plan.messages))
