from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nudging_core.templates import (
    BUILTIN_TEMPLATES,
    JinjaChatTemplate,
    Message,
    TemplateError,
    base_prompt,
    get_chat_template,
    normalize_messages,
)

S = "You are a helpful assistant."
U = "What is the capital of France?"

SINGLE = [Message("system", S), Message("user", U)]
NO_SYSTEM = [Message("user", U)]
MULTI = [
    Message("system", S),
    Message("user", "u1"),
    Message("assistant", "a1"),
    Message("user", "u2"),
]


def render(name: str, messages: list[Message], response_start: str = "") -> str:
    return get_chat_template(name).render(messages, response_start)


# --- normalize_messages -------------------------------------------------------------------


def test_normalize_plain_and_developer() -> None:
    raw: list[dict[str, Any]] = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
    ]
    assert normalize_messages(raw) == [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", ""),
    ]


def test_normalize_text_parts_joined_with_newline() -> None:
    raw = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert normalize_messages(raw) == [Message("user", "a\nb")]
    assert normalize_messages([{"role": "user", "content": []}]) == [Message("user", "")]


def test_tool_use_renders_as_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    messages = normalize_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c9", "content": [{"type": "text", "text": "12 C"}]},
    ])
    assert messages == [
        Message("user", "Weather in Oslo?"),
        Message("assistant", 'Let me look.\nTool call: weather({"city": "Oslo"})'),
        Message("user", "Tool result (weather): sunny\nTool result (tool): 12 C"),
    ]
    assert base_prompt(messages) == ('Weather in Oslo?\nLet me look.\nTool call: weather({"city": "Oslo"})\n'
                                     "Tool result (weather): sunny\nTool result (tool): 12 C\n")
    # Families that need user/assistant turns to alternate take it as such a turn.
    assert get_chat_template("gemma-it").render(messages).endswith(
        "Tool result (tool): 12 C<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
        ([{"role": "user", "content": ["hi"]}], "only text parts"),
        ([{"role": "user", "content": None}], "must not be null"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "assistant", "content": None, "tool_calls": "x"}], "tool_calls must be a list"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 3}}]}],
         "tool_calls[0] must have a function"),
        ([{"role": "tool", "tool_call_id": "c1", "content": None}], "must not be null"),
        ([{"role": "function", "content": "x"}], "'function' is not supported"),
        ([{"content": "x"}], "None is not supported"),
        (["hi"], "must be an object"),
        ([], "at least one"),
    ],
)
def test_normalize_rejects(raw: list[Any], fragment: str) -> None:
    with pytest.raises(TemplateError) as info:
        normalize_messages(raw)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


# --- base_prompt ----------------------------------------------------------------------------


def test_base_prompt_layouts() -> None:
    assert base_prompt(SINGLE, default_system=None) == f"{S}\n{U}\n"
    assert base_prompt(NO_SYSTEM, default_system=None) == f"{U}\n"
    assert base_prompt(NO_SYSTEM, default_system="D", answer_start="Answer:") == f"D\n{U}\nAnswer:"
    # A request's own system message wins over the configured default.
    assert base_prompt(SINGLE, default_system="D") == f"{S}\n{U}\n"
    # An empty default is no default.
    assert base_prompt(NO_SYSTEM, default_system="") == f"{U}\n"


def test_base_prompt_multi_turn_and_several_systems() -> None:
    assert base_prompt(MULTI, default_system=None) == f"{S}\nu1\na1\nu2\n"
    two_systems = [
        Message("system", "s1"),
        Message("user", "u"),
        Message("system", "s2"),
        Message("user", "v"),
    ]
    assert base_prompt(two_systems, default_system="D") == "s1\ns2\nu\nv\n"


@pytest.mark.parametrize(
    "messages",
    [
        [Message("system", S)],
        [Message("user", U), Message("assistant", "partial")],
    ],
)
def test_base_prompt_needs_final_user(messages: list[Message]) -> None:
    with pytest.raises(TemplateError, match="user message"):
        base_prompt(messages, default_system=None)


# --- built-in templates: the paper's strings ------------------------------------------------


def test_builtin_names() -> None:
    assert BUILTIN_TEMPLATES == ("llama-2-chat", "llama-3-instruct", "gemma-it", "olmo-instruct", "chatml")


def test_llama_2_chat() -> None:
    assert render("llama-2-chat", SINGLE) == f"[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U} [/INST] "
    assert render("llama-2-chat", SINGLE, "  Sure") == f"[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U} [/INST] Sure"
    assert render("llama-2-chat", NO_SYSTEM) == f"[INST] {U} [/INST] "
    assert render("llama-2-chat", MULTI) == (
        f"[INST] <<SYS>>\n{S}\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST] "
    )


def test_llama_3_instruct() -> None:
    assert render("llama-3-instruct", SINGLE, "R") == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nR"
    )
    assert render("llama-3-instruct", NO_SYSTEM) == (
        f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render("llama-3-instruct", MULTI) == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nu1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nu2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gemma_it_folds_system_into_user_turn() -> None:
    assert render("gemma-it", SINGLE, "R") == (
        f"<start_of_turn>user\n{S}\n{U}<end_of_turn>\n<start_of_turn>model\nR"
    )
    assert render("gemma-it", NO_SYSTEM) == f"<start_of_turn>user\n{U}<end_of_turn>\n<start_of_turn>model\n"
    assert render("gemma-it", MULTI) == (
        f"<start_of_turn>user\n{S}\nu1<end_of_turn>\n<start_of_turn>model\n"
        "a1<end_of_turn>\n"
        "<start_of_turn>user\nu2<end_of_turn>\n<start_of_turn>model\n"
    )


def test_olmo_instruct() -> None:
    assert render("olmo-instruct", SINGLE, "R") == f"<|endoftext|><|user|>\n{S}\n{U}\n<|assistant|>\nR"
    assert render("olmo-instruct", NO_SYSTEM) == f"<|endoftext|><|user|>\n{U}\n<|assistant|>\n"
    assert render("olmo-instruct", MULTI) == (
        f"<|endoftext|><|user|>\n{S}\nu1\n<|assistant|>\na1<|endoftext|>\n"
        "<|user|>\nu2\n<|assistant|>\n"
    )


def test_chatml() -> None:
    assert render("chatml", SINGLE, "R") == (
        f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\nR"
    )
    assert render("chatml", NO_SYSTEM) == f"<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n"
    assert render("chatml", MULTI) == (
        f"<|im_start|>system\n{S}<|im_end|>\n"
        "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_several_system_messages_fold_joined() -> None:
    messages = [Message("system", "s1"), Message("system", "s2"), Message("user", "u")]
    assert (
        render("gemma-it", messages) == "<start_of_turn>user\ns1\ns2\nu<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtins_need_final_user(name: str) -> None:
    with pytest.raises(TemplateError, match="last message must be a user message"):
        render(name, [Message("user", "u"), Message("assistant", "a")])
    with pytest.raises(TemplateError, match="at least one user message"):
        render(name, [Message("system", "s")])


@pytest.mark.parametrize("name", ["llama-2-chat", "gemma-it", "olmo-instruct"])
def test_folding_templates_need_alternation(name: str) -> None:
    with pytest.raises(TemplateError, match="alternate"):
        render(name, [Message("user", "a"), Message("user", "b")])
    with pytest.raises(TemplateError, match="alternate"):
        render(name, [Message("assistant", "a"), Message("user", "b")])


# --- get_chat_template ----------------------------------------------------------------------


def test_auto_needs_upstream_renderer() -> None:
    with pytest.raises(TemplateError, match="upstream renderer"):
        get_chat_template("auto")


def test_unknown_template_lists_builtins() -> None:
    with pytest.raises(TemplateError) as info:
        get_chat_template("vicuna")
    for name in BUILTIN_TEMPLATES:
        assert name in str(info.value)


def test_missing_jinja_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read"):
        get_chat_template(str(tmp_path / "missing.jinja"))


# --- jinja ----------------------------------------------------------------------------------

# A chatml template written the way HF tokenizer configs write them (Qwen2-style default system
# prompt); its layout relies on trim_blocks/lstrip_blocks, as HF's environment sets them.
HF_CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""


def test_jinja_file_renders_hf_chatml(tmp_path: Path) -> None:
    path = tmp_path / "chatml.jinja"
    path.write_text(HF_CHATML, encoding="utf-8")
    template = get_chat_template(str(path))
    assert template.name == str(path)
    assert template.render(SINGLE) == render("chatml", SINGLE)
    assert template.render(NO_SYSTEM, "R") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\nR"
    )


def test_jinja_tokens_and_j2_suffix(tmp_path: Path) -> None:
    path = tmp_path / "t.j2"
    path.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    template = get_chat_template(str(path), bos_token="<s>", eos_token="</s>")
    assert template.render(SINGLE) == f"<s>{S}</s>{U}</s>"
    assert JinjaChatTemplate("{{ bos_token }}x").render(NO_SYSTEM) == "x"


def test_jinja_raise_exception() -> None:
    template = JinjaChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="^roles must alternate$"):
        template.render(NO_SYSTEM)


def test_jinja_tojson_and_loopcontrols() -> None:
    template = JinjaChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}{% endfor %}"
    )
    assert (
        template.render([Message("system", "s"), Message("user", "é")]) == '{"role": "user", "content": "é"}'
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set _ = messages.append({'role': 'user'}) %}",
        "{% set _ = messages[0].update({'role': 'system'}) %}",
    ],
)
def test_jinja_sandbox_rejects_unsafe_access(source: str) -> None:
    template = JinjaChatTemplate(source, name="evil")
    with pytest.raises(TemplateError, match="chat template 'evil' failed"):
        template.render(NO_SYSTEM)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ messages[0].content.format.__globals__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
    ],
)
def test_jinja_sandbox_hides_internals(source: str) -> None:
    # As in HF's environment, an unsafe attribute is an undefined value: it prints as ""
    # and raises only when used further; either way nothing from Python leaks out.
    assert JinjaChatTemplate(source).render(NO_SYSTEM) == ""


def test_jinja_syntax_error() -> None:
    with pytest.raises(TemplateError, match="syntax error at line 1"):
        JinjaChatTemplate("{% for m in messages %}")


def test_jinja_runtime_error_becomes_template_error() -> None:
    with pytest.raises(TemplateError, match="failed"):
        JinjaChatTemplate("{{ 1 / 0 }}").render(NO_SYSTEM)
