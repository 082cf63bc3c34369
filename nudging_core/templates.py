"""Chat messages -> prompt text.

Two kinds of prompt come out of a chat request:

* the base model's prompt, a plain layout (`base_prompt`), because a base model has no chat
  template and the paper prompts it with the bare text;
* the nudging model's prompt, its chat template with a generation prompt (`ChatTemplate`):
  a built-in family that reproduces the paper's strings exactly, or a jinja file rendered the
  way HF tokenizers render `chat_template`.

The template `auto` (let the upstream server render its own template) needs network access,
so it is resolved by the caller, not here. This module imports no web framework.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

MessageRole = Literal["system", "user", "assistant"]

AUTO_TEMPLATE: Final = "auto"
JINJA_SUFFIXES: Final = (".jinja", ".j2")

# Text parts of one message are joined with a newline, as vLLM does when it flattens parts
# for a string-content chat template; with the same joiner, `auto` (rendered by vLLM) and the
# built-ins see the same message text.
TEXT_PART_SEPARATOR: Final = "\n"

_ROLES: Final[Mapping[str, MessageRole]] = {
    "system": "system",
    # OpenAI's newer name for system instructions; models have no separate slot for it.
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


class TemplateError(ValueError):
    """Messages that cannot be rendered, or a template that cannot be loaded or run."""


@dataclass(frozen=True, slots=True)
class Message:
    role: MessageRole
    content: str


# The text form of tool use in rendered prompts (the same for every template and for the base's
# plain layout): calls on lines after the assistant's text, results as the next user turn.
TOOL_CALL_LINE: Final = "Tool call: {name}({arguments})"
TOOL_RESULT_LINE: Final = "Tool result ({name}): {content}"


def normalize_messages(raw: Sequence[Mapping[str, Any]]) -> list[Message]:
    """OpenAI chat messages (plain dicts) -> `Message`s.

    `content` may be a string, a list of text parts (`{"type": "text", "text": ...}`, joined
    with `TEXT_PART_SEPARATOR`), or null on an assistant message (read as ""). Role
    `developer` becomes `system`. Tool use becomes text (`TOOL_CALL_LINE`, `TOOL_RESULT_LINE`):
    an assistant's `tool_calls` follow its text, and `tool` messages (consecutive ones joined)
    are a user turn naming the function their `tool_call_id` called. Anything else (images,
    ...) is a `TemplateError`: text models cannot take it.
    """
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TemplateError("messages must be a list of message objects")
    if not raw:
        raise TemplateError("messages must contain at least one message")
    messages: list[Message] = []
    called: dict[str, str] = {}  # tool_call_id -> function name
    after_tool = False  # the last message is tool results, which the next ones join
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise TemplateError(f"messages[{i}] must be an object with 'role' and 'content'")
        given = item.get("role")
        if given == "tool":
            line = _tool_result(item, i, called)
            if after_tool:
                messages[-1] = Message("user", messages[-1].content + "\n" + line)
            else:
                messages.append(Message("user", line))
            after_tool = True
            continue
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise TemplateError(
                f"messages[{i}].role {given!r} is not supported; "
                "use one of: system, developer, user, assistant, tool"
            )
        content = _content_text(item.get("content"), role, i)
        if role == "assistant" and item.get("tool_calls"):
            content = "\n".join(([content] if content else []) + _tool_calls(item["tool_calls"], i, called))
        messages.append(Message(role, content))
        after_tool = False
    return messages


def _tool_calls(calls: object, index: int, called: dict[str, str]) -> list[str]:
    if not isinstance(calls, list):
        raise TemplateError(f"messages[{index}].tool_calls must be a list")
    lines: list[str] = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        arguments = function.get("arguments", "") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise TemplateError(
                f"messages[{index}].tool_calls[{j}] must have a function with a string name and arguments"
            )
        call_id = call.get("id") if isinstance(call, Mapping) else None
        if isinstance(call_id, str):
            called[call_id] = name
        lines.append(TOOL_CALL_LINE.format(name=name, arguments=arguments))
    return lines


def _tool_result(item: Mapping[str, Any], index: int, called: Mapping[str, str]) -> str:
    content = _content_text(item.get("content"), "user", index)
    call_id = item.get("tool_call_id")
    name = called.get(call_id, "tool") if isinstance(call_id, str) else "tool"
    return TOOL_RESULT_LINE.format(name=name, content=content)


def _content_text(content: object, role: MessageRole, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        # OpenAI allows a null assistant content (it then carries tool calls).
        if role == "assistant":
            return ""
        raise TemplateError(f"messages[{index}].content must not be null for a {role} message")
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                raise TemplateError(
                    f"messages[{index}].content[{j}] has type {kind!r}; "
                    "only text parts ({'type': 'text', 'text': ...}) are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise TemplateError(f"messages[{index}].content[{j}].text must be a string")
            texts.append(text)
        return TEXT_PART_SEPARATOR.join(texts)
    raise TemplateError(
        f"messages[{index}].content must be a string or a list of text parts"
    )


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """System text (all system messages joined with a newline; None if there are none) and
    the remaining conversation turns, in order."""
    systems = [m.content for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    return ("\n".join(systems) if systems else None), turns


def _require_final_user(messages: Sequence[Message]) -> None:
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise TemplateError("the conversation needs at least one user message")
    if turns[-1].role != "user":
        # Continuing a partial assistant message would need a template without the
        # generation prompt; the answer start is given by `response_start` instead.
        raise TemplateError(
            f"the last message must be a user message, not {turns[-1].role}"
        )


def base_prompt(
    messages: Sequence[Message],
    *,
    default_system: str | None = None,
    answer_start: str = "",
) -> str:
    """The base model's prompt, in the paper's plain layout.

    Single turn: ``"{system}\\n{user}\\n{answer_start}"``. Without a system message and
    without a (non-empty) `default_system`, the system line is left out:
    ``"{user}\\n{answer_start}"`` (the original script left an empty first line).

    Several system messages are joined with a newline and always go first, wherever they
    appear. Multi-turn chats continue the same plain layout: every earlier user and
    assistant message on its own line(s), in order, each followed by a newline, so
    ``"{system}\\n{user1}\\n{assistant1}\\n{user2}\\n{answer_start}"``. The last
    non-system message must be a user message.
    """
    system, turns = _split_system(messages)
    _require_final_user(turns)
    if system is None and default_system:
        system = default_system
    lines = ([] if system is None else [system]) + [m.content for m in turns]
    return "\n".join(lines) + "\n" + answer_start


class ChatTemplate(Protocol):
    """Renders a conversation for a chat model, ending with the generation prompt, then
    `response_start` (text the answer should begin with; usually "")."""

    @property
    def name(self) -> str: ...

    def render(self, messages: Sequence[Message], response_start: str = "") -> str: ...


# --- Built-in families -------------------------------------------------------------------
#
# Layouts reproduce the paper's nudging prompts exactly for one system prompt S, one user
# message U and response start R, and extend to several turns the way each family's official
# template does. No BOS token: servers add it when they tokenize the prompt. Message text is
# used verbatim, as in the paper's strings (the official templates strip it in places), except
# llama-2's earlier answers, stripped like its official template does since spaces surround them.
# Families without a system role (llama-2, gemma, olmo) fold the system text into the first
# user turn, and need turns alternating user/assistant.


def _pairs(turns: Sequence[Message]) -> list[tuple[str, str | None]]:
    """Turns as (user, assistant answer or None for the final open turn)."""
    pairs: list[tuple[str, str | None]] = []
    for i, message in enumerate(turns):
        expected: MessageRole = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise TemplateError(
                "this chat template needs the conversation to alternate "
                "user/assistant/user/..., starting and ending with a user message"
            )
        if expected == "user":
            pairs.append((message.content, None))
        else:
            pairs[-1] = (pairs[-1][0], message.content)
    return pairs


def _llama_2_chat(messages: Sequence[Message], response_start: str) -> str:
    # "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] R"
    system, turns = _split_system(messages)
    out: list[str] = []
    for k, (user, answer) in enumerate(_pairs(turns)):
        if k == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        if k > 0:
            out.append("<s>")  # the first BOS comes from the server
        out.append(f"[INST] {user} [/INST]")
        if answer is not None:
            out.append(f" {answer.strip()} </s>")
    return "".join(out) + " " + response_start.lstrip()


def _llama_3_instruct(messages: Sequence[Message], response_start: str) -> str:
    # Llama 3 has a header per message, system included, so messages render in place.
    blocks = [
        f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content}<|eot_id|>"
        for m in messages
    ]
    return "".join(blocks) + f"<|start_header_id|>assistant<|end_header_id|>\n\n{response_start}"


def _system_in_first_user(messages: Sequence[Message], response_start: str, *, opening: str,
                          user_turn: str, answer_turn: str) -> str:
    # Families without a system role put the system text before the first user message.
    system, turns = _split_system(messages)
    out = [opening]
    for k, (user, answer) in enumerate(_pairs(turns)):
        if k == 0 and system is not None:
            user = f"{system}\n{user}"
        out.append(user_turn.format(user=user))
        if answer is not None:
            out.append(answer_turn.format(answer=answer))
    return "".join(out) + response_start


def _gemma_it(messages: Sequence[Message], response_start: str) -> str:
    # "<start_of_turn>user\nS\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n..."
    return _system_in_first_user(
        messages, response_start, opening="",
        user_turn="<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n",
        answer_turn="{answer}<end_of_turn>\n",
    )


def _olmo_instruct(messages: Sequence[Message], response_start: str) -> str:
    # "<|endoftext|><|user|>\nS\nU1\n<|assistant|>\nA1<|endoftext|>\n<|user|>\nU2\n..."
    return _system_in_first_user(
        messages, response_start, opening="<|endoftext|>",
        user_turn="<|user|>\n{user}\n<|assistant|>\n", answer_turn="{answer}<|endoftext|>\n",
    )


def _chatml(messages: Sequence[Message], response_start: str) -> str:
    blocks = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    return "".join(blocks) + f"<|im_start|>assistant\n{response_start}"


@dataclass(frozen=True, slots=True)
class BuiltinChatTemplate:
    name: str
    layout: Callable[[Sequence[Message], str], str]

    def render(self, messages: Sequence[Message], response_start: str = "") -> str:
        _require_final_user(messages)
        return self.layout(messages, response_start)


_BUILTINS: Final[Mapping[str, BuiltinChatTemplate]] = {
    t.name: t
    for t in (
        BuiltinChatTemplate("llama-2-chat", _llama_2_chat),
        BuiltinChatTemplate("llama-3-instruct", _llama_3_instruct),
        BuiltinChatTemplate("gemma-it", _gemma_it),
        BuiltinChatTemplate("olmo-instruct", _olmo_instruct),
        BuiltinChatTemplate("chatml", _chatml),
    )
}

BUILTIN_TEMPLATES: Final[tuple[str, ...]] = tuple(_BUILTINS)


# --- Jinja templates (HF `chat_template` files) ------------------------------------------


def _raise_exception(message: str) -> NoReturn:
    # HF templates call raise_exception() to reject conversations they cannot format.
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF overrides jinja's tojson, which HTML-escapes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def hf_jinja_environment() -> ImmutableSandboxedEnvironment:
    # Same environment as HF tokenizers' apply_chat_template, so templates copied from a
    # model's tokenizer_config.json render identically; the sandbox keeps a template file
    # from reaching Python internals.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class JinjaChatTemplate:
    """A jinja chat template, rendered with `messages` (list of {"role", "content"} dicts,
    developer already mapped to system), `add_generation_prompt=True`, `bos_token` and
    `eos_token`. `response_start` is appended after the rendered text."""

    def __init__(
        self, source: str, *, name: str = "jinja", bos_token: str = "", eos_token: str = ""
    ) -> None:
        self._name = name
        self._bos_token = bos_token
        self._eos_token = eos_token
        try:
            self._template = hf_jinja_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"chat template {name!r} has a syntax error at line {exc.lineno}: {exc.message}"
            ) from exc

    @classmethod
    def from_file(
        cls, path: str | Path, *, bos_token: str = "", eos_token: str = ""
    ) -> JinjaChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"cannot read chat template file {str(path)!r}: {exc}") from exc
        return cls(source, name=str(path), bos_token=bos_token, eos_token=eos_token)

    @property
    def name(self) -> str:
        return self._name

    def render(self, messages: Sequence[Message], response_start: str = "") -> str:
        _require_final_user(messages)
        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except TemplateError:
            raise
        except Exception as exc:
            # A template is user-supplied code: whatever it raises (SecurityError from the
            # sandbox, undefined names, a TypeError) means "cannot render these messages".
            raise TemplateError(f"chat template {self._name!r} failed: {exc}") from exc
        return text + response_start


def get_chat_template(
    name_or_path: str, *, bos_token: str = "", eos_token: str = ""
) -> ChatTemplate:
    """A built-in template by name, or a jinja template from a `.jinja`/`.j2` file.

    `bos_token`/`eos_token` only apply to jinja files (built-ins have their own). `auto` is
    rejected here: it is rendered by the upstream server, which the caller must ask.
    """
    if name_or_path == AUTO_TEMPLATE:
        raise TemplateError(
            "chat template 'auto' is rendered by the upstream server and needs an "
            "upstream renderer; it cannot be loaded locally"
        )
    builtin = _BUILTINS.get(name_or_path)
    if builtin is not None:
        return builtin
    if name_or_path.endswith(JINJA_SUFFIXES):
        return JinjaChatTemplate.from_file(name_or_path, bos_token=bos_token, eos_token=eos_token)
    raise TemplateError(
        f"unknown chat template {name_or_path!r}; use one of "
        f"{', '.join(BUILTIN_TEMPLATES)}, 'auto', or a path to a .jinja/.j2 file"
    )
