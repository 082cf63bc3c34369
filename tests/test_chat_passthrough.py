"""Chat passthrough: a passthrough model whose upstream serves chat itself forwards the chat
request as it came and answers what the upstream answered, whole and streamed, so tools and
response formats work; a nudged model with `on_tools: nudging_only` answers such requests with
its nudging model alone. Compared with the simulator's own answers, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nudging_core.config import ConfigError, parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
REQUESTS: dict[str, dict[str, Any]] = {
    "plain": {"messages": QUESTION, "max_tokens": 12},
    "stop": {"messages": QUESTION, "max_tokens": 20, "stop": ["blue"]},
    "tool_required": {"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required"},
    "tool_named": {"messages": QUESTION, "tools": [WEATHER],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "tool_result": {"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                 {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}],
                    "tools": [WEATHER], "max_tokens": 8},
    "json_object": {"messages": QUESTION, "response_format": {"type": "json_object"}},
    "json_schema": {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object", "properties": {"reason": {"type": "string"},
                                                                       "certain": {"type": "boolean"}}}}}},
}
# What differs between two answers to the same request, whoever sends them.
PER_ANSWER = ("id", "created", "model")


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0)))
        base = stack.enter_context(running(create_simulator("base", time_scale=0)))
        config = parse_config({"models": [
            {"name": "aligned-auto", "method": "nudging_only",
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "auto"}},
            {"name": "aligned-chat", "method": "base_only", "passthrough": "chat", "default_max_tokens": 5,
             "base": {"url": aligned + "/v1", "model": "aligned"}},
            {"name": "aligned-rendered", "method": "nudging_only",
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}},
            {"name": "nudged", "base": {"url": base + "/v1", "model": "base"},
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}},
            {"name": "nudged-tools", "on_tools": "nudging_only",
             "base": {"url": base + "/v1", "model": "base"},
             "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}},
        ]})
        yield aligned, stack.enter_context(running(create_proxy(config)))


def _post(url: str, model: str, request: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "temperature": 0, **request})


def _whole(url: str, model: str, request: dict[str, Any]) -> dict[str, Any]:
    response = _post(url, model, request)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _streamed(url: str, model: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **request}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _shared(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key not in PER_ANSWER}


@pytest.mark.parametrize("model", ["aligned-auto", "aligned-chat"])
@pytest.mark.parametrize("name", REQUESTS)
def test_whole_chat_answer_is_the_upstream_s(urls: tuple[str, str], model: str, name: str) -> None:
    simulator, proxy = urls
    request = {"max_tokens": 5, **REQUESTS[name]}
    direct, passed = _whole(simulator, "aligned", request), _whole(proxy, model, request)
    assert passed["model"] == model and passed["object"] == "chat.completion"
    assert _shared(passed) == _shared(direct)


@pytest.mark.parametrize("name", REQUESTS)
def test_streamed_chat_answer_is_the_upstream_s(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    direct, passed = _streamed(simulator, "aligned", REQUESTS[name]), _streamed(proxy, "aligned-auto",
                                                                               REQUESTS[name])
    assert all(chunk["model"] == "aligned-auto" for chunk in passed)
    assert [_shared(chunk) for chunk in passed] == [_shared(chunk) for chunk in direct]


def test_tools_and_response_format_reach_the_upstream(urls: tuple[str, str]) -> None:
    proxy = urls[1]
    message = _whole(proxy, "aligned-auto", REQUESTS["tool_named"])["choices"][0]["message"]
    assert [(call["type"], call["function"]["name"], json.loads(call["function"]["arguments"]))
            for call in message["tool_calls"]] == [("function", "get_weather", {"city": "simulated"})]
    content = _whole(proxy, "aligned-auto", REQUESTS["json_schema"])["choices"][0]["message"]["content"]
    assert json.loads(content) == {"reason": "simulated", "certain": False}


def test_the_budget_is_the_model_s(urls: tuple[str, str]) -> None:
    proxy = urls[1]
    # No max_tokens: the model's default_max_tokens (5) goes to the upstream.
    answer = _whole(proxy, "aligned-chat", {"messages": QUESTION})
    assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"] == "length"
    over = _post(proxy, "aligned-chat", {"messages": QUESTION, "max_completion_tokens": 5000})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"


def test_upstream_refusals_are_the_client_s_400(urls: tuple[str, str]) -> None:
    # The simulator's chat serves no logprobs: its 400 is the client's, as for completions.
    response = _post(urls[1], "aligned-auto", {"messages": QUESTION, "logprobs": True})
    assert response.status_code == 400, response.text
    assert "logprobs" in response.json()["error"]["message"]


@pytest.mark.parametrize(("request_body", "param"), [
    ({"messages": QUESTION, "tools": [WEATHER]}, "tools"),
    ({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required"}, "tools"),
])
def test_tools_where_the_proxy_renders_the_chat_are_a_400(
    urls: tuple[str, str], request_body: dict[str, Any], param: str
) -> None:
    response = _post(urls[1], "aligned-rendered", request_body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_tool_history_where_the_proxy_renders_the_chat_is_text(urls: tuple[str, str]) -> None:
    # The rendered prompt carries the call and its result in their text form (README).
    simulator, proxy = urls
    answer = _whole(proxy, "aligned-rendered", {"messages": REQUESTS["tool_result"]["messages"],
                                                "max_tokens": 8})
    prompt = ("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
              '<|im_start|>assistant\nTool call: get_weather({"city": "Oslo"})<|im_end|>\n'
              "<|im_start|>user\nTool result (get_weather): sunny<|im_end|>\n<|im_start|>assistant\n")
    direct = httpx.post(simulator + "/v1/completions", timeout=30, json={
        "model": "aligned", "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["text"]
    assert answer["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]


@pytest.mark.parametrize("name", ["tool_required", "json_object"])
def test_nudged_model_refuses_tools_by_default(urls: tuple[str, str], name: str) -> None:
    response = _post(urls[1], "nudged", REQUESTS[name])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] in ("tools", "response_format") and "on_tools" in error["message"]


@pytest.mark.parametrize("name", ["tool_required", "tool_named", "json_object", "json_schema"])
def test_on_tools_nudging_only_answers_with_the_nudging_model(urls: tuple[str, str], name: str) -> None:
    simulator, proxy = urls
    direct = _whole(simulator, "aligned", REQUESTS[name])
    passed = _whole(proxy, "nudged-tools", REQUESTS[name])
    choice = passed["choices"][0]
    assert choice.pop("nudging") == {"fallback": "nudging_only", "fallback_reason": "tools"}
    assert _shared(passed) == _shared(direct)
    chunks = _streamed(proxy, "nudged-tools", REQUESTS[name])
    reports = [choice.get("nudging") for chunk in chunks for choice in chunk["choices"]]
    assert reports[-1] == {"fallback": "nudging_only", "fallback_reason": "tools"}
    assert not any(reports[:-1])


def test_on_tools_leaves_other_requests_nudged(urls: tuple[str, str]) -> None:
    answer = _whole(urls[1], "nudged-tools", {**REQUESTS["plain"], "nudging": {"return_provenance": True}})
    report = answer["choices"][0]["nudging"]
    assert "fallback" not in report and report["rounds"] >= 1


@pytest.mark.parametrize(("model", "field"), [
    ({"method": "nudging", "passthrough": "chat"}, "passthrough"),
    ({"method": "base_only", "on_tools": "nudging_only"}, "on_tools"),
    ({"method": "nudging", "on_tools": "always"}, "on_tools"),
])
def test_config_names_the_bad_setting(model: dict[str, Any], field: str) -> None:
    upstream = {"url": "http://127.0.0.1:1/v1", "model": "m", "chat_template": "chatml"}
    with pytest.raises(ConfigError, match=field):
        parse_config({"models": [{"name": "m", "base": upstream, "nudging": upstream, **model}]})


def cut_upstream() -> Starlette:
    """A chat upstream whose stream ends after two chunks, without a finish reason."""

    async def chat(request: Request) -> Response:
        chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
            {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}]}
            for word in ("One", " two")]
        return Response("".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks),
                        media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_a_cut_chat_stream_ends_with_an_error_event() -> None:
    with running(cut_upstream()) as upstream:
        base = {"url": upstream + "/v1", "model": "m", "dialect": "vllm"}
        config = parse_config({"models": [
            {"name": "chat", "method": "base_only", "passthrough": "chat", "base": base}]})
        with running(create_proxy(config)) as proxy:
            chunks = _streamed(proxy, "chat", {"messages": QUESTION})
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == "One two"
    error = chunks[-1]["error"]
    assert error["type"] == "upstream_error" and "finish reason" in error["message"]


def no_template_upstream() -> Starlette:
    """A chat upstream whose model has no chat template, answering as vLLM 0.32 does."""

    async def chat(request: Request) -> Response:
        message = ("As of transformers v4.44, default chat template is no longer allowed, so you must "
                   "provide a chat template if the tokenizer does not define one.")
        return Response(json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                              "code": 400}}), status_code=400, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_to_a_server_without_a_template_is_a_configuration_error(stream: bool) -> None:
    with running(no_template_upstream()) as upstream:
        config = parse_config({"models": [
            {"name": "chat", "method": "nudging_only", "passthrough": "chat",
             "nudging": {"url": upstream + "/v1", "model": "m", "dialect": "vllm"}}]})
        with running(create_proxy(config)) as proxy:
            response = _post(proxy, "chat", {"messages": QUESTION, "stream": stream})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "chat_template_unavailable" and "passthrough: completions" in error["message"]


def _tokens_metric(proxy: str, model: str, source: str) -> float:
    prefix = f'nudging_proxy_completion_tokens_total{{model="{model}",source="{source}"}}'
    lines = [line for line in httpx.get(proxy + "/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_forwarded_answers_count_in_the_metrics(urls: tuple[str, str], stream: bool) -> None:
    proxy = urls[1]
    before = _tokens_metric(proxy, "aligned-auto", "nudging")
    request = {"messages": QUESTION, "max_tokens": 6}
    if stream:
        chunks = _streamed(proxy, "aligned-auto", request)
        tokens = chunks[-1]["usage"]["completion_tokens"]
    else:
        tokens = _whole(proxy, "aligned-auto", request)["usage"]["completion_tokens"]
    assert tokens > 0
    assert _tokens_metric(proxy, "aligned-auto", "nudging") == before + tokens
