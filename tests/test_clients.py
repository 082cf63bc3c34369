"""The clients our users run, unchanged, against the proxy on the simulator stack over real HTTP:
the `openai` SDK, langchain-openai and litellm. Every response body and stream chunk the proxy
sends in these tests is checked against OpenAI's published schema, as the `openai` package's
types (generated from OpenAI's OpenAPI spec) encode it; README's compatibility table is this
suite's findings."""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.shared import ErrorObject
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

QUESTION = "Why do leaves change color in autumn?"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
PROMPTS = ["Why do leaves change color in autumn?\n", "How do bees make honey?\n"]


@dataclass
class Exchange:
    path: str
    status: int = 0
    content_type: str = ""
    body: bytearray = field(default_factory=bytearray)


class Recorder:
    """ASGI middleware that keeps what the proxy sent back, so each test can check every body
    and chunk against the schema whichever client made the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope["path"])
        self.exchanges.append(exchange)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                headers = dict(message.get("headers", []))
                exchange.content_type = headers.get(b"content-type", b"").decode()
            elif message["type"] == "http.response.body":
                exchange.body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class Stack:
    proxy: str
    recorder: Recorder

    @property
    def v1(self) -> str:
        return self.proxy + "/v1"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as stack:
        base, aligned = (stack.enter_context(running(create_simulator(profile, time_scale=0)))
                         for profile in ("base", "aligned"))
        pair = {"base": {"url": base + "/v1", "model": "base"},
                "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}}
        config = parse_config({"models": [
            {"name": "nudged", **pair},
            {"name": "base-only", "method": "base_only", "base": pair["base"]},
            {"name": "aligned-only", "method": "nudging_only", "nudging": pair["nudging"]},
            # The upstream's own chat endpoint answers: its tool calls come back.
            {"name": "aligned-chat", "method": "nudging_only", "passthrough": "chat",
             "nudging": pair["nudging"]},
            {"name": "nudged-tools", "on_tools": "nudging_only", **pair},
        ]})
        recorder = Recorder(create_proxy(config))
        yield Stack(stack.enter_context(running(recorder)), recorder)


def sse_payloads(body: bytes | bytearray) -> list[dict[str, Any]]:
    lines = body.decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def check_chat_message(completion: dict[str, Any]) -> None:
    # The SDK's types default `refusal` to None, but the spec lists it as required (nullable).
    for choice in completion["choices"]:
        assert "refusal" in choice["message"], choice


def unfinished_as_stop(chunk: dict[str, Any]) -> dict[str, Any]:
    """The spec has no chunk type for streamed completions: the SDK parses chunks as `Completion`,
    whose `finish_reason` cannot be null, yet OpenAI (and vLLM) stream null until a choice ends."""
    choices = [{**choice, "finish_reason": choice["finish_reason"] or "stop"} for choice in chunk["choices"]]
    return {**chunk, "choices": choices}


def check_against_schema(exchange: Exchange) -> None:
    """One response as OpenAI's spec describes it: strict validation (no coercion) with the
    SDK's generated types; extra fields (the `nudging` extension) are allowed by the spec."""
    if exchange.status >= 400:
        ErrorObject.model_validate(json.loads(exchange.body)["error"], strict=True)
        return
    path, streamed = exchange.path, exchange.content_type.startswith("text/event-stream")
    if path == "/v1/chat/completions" and streamed:
        for chunk in sse_payloads(exchange.body):
            ChatCompletionChunk.model_validate(chunk, strict=True)
    elif path == "/v1/chat/completions":
        body = json.loads(exchange.body)
        ChatCompletion.model_validate(body, strict=True)
        check_chat_message(body)
    elif path == "/v1/completions" and streamed:
        for chunk in sse_payloads(exchange.body):
            Completion.model_validate(unfinished_as_stop(chunk), strict=True)
    elif path == "/v1/completions":
        Completion.model_validate(json.loads(exchange.body), strict=True)
    elif path == "/v1/models":
        for card in json.loads(exchange.body)["data"]:
            Model.model_validate(card, strict=True)
    elif path.startswith("/v1/models/"):
        Model.model_validate(json.loads(exchange.body), strict=True)
    else:
        raise AssertionError(f"no schema for {path}")


@pytest.fixture(autouse=True)
def schema_checked(stack: Stack) -> Iterator[None]:
    """After each test: everything the proxy answered during it, against the schema."""
    stack.recorder.exchanges.clear()
    yield
    for exchange in stack.recorder.exchanges:
        check_against_schema(exchange)


GOOD_CHOICE: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                               "message": {"role": "assistant", "content": "hi", "refusal": None}}
GOOD_CHAT: dict[str, Any] = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                             "choices": [GOOD_CHOICE]}


@pytest.mark.parametrize("body", [
    {**GOOD_CHAT, "created": "1"},
    {**GOOD_CHAT, "object": "chat.completion.chunk"},
    {**GOOD_CHAT, "choices": [{**GOOD_CHOICE, "finish_reason": "done"}]},
    {**GOOD_CHAT, "choices": [{**GOOD_CHOICE, "message": {"role": "assistant", "content": "hi"}}]},
])
def test_the_schema_check_refuses_what_the_spec_does(body: dict[str, Any]) -> None:
    check_against_schema(Exchange("/v1/chat/completions", 200, "application/json",
                                  bytearray(json.dumps(GOOD_CHAT).encode())))
    with pytest.raises((ValueError, AssertionError)):
        check_against_schema(Exchange("/v1/chat/completions", 200, "application/json",
                                      bytearray(json.dumps(body).encode())))


# --- the openai SDK -------------------------------------------------------------------------


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_openai_chat_streamed_and_not(stack: Stack, model: str) -> None:
    client = sdk(stack)
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24)
    assert whole.choices[0].message.content
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_openai_completions_streamed_and_not(stack: Stack, model: str) -> None:
    client = sdk(stack)
    whole = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16)
    assert whole.choices[0].text
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_openai_stream_helper(stack: Stack, model: str) -> None:
    # A stop string ends it: the helper raises LengthFinishReasonError on finish_reason "length".
    with sdk(stack).chat.completions.stream(model=model, messages=MESSAGES, max_tokens=200,
                                            stop=["."]) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "content.delta")
        final = stream.get_final_completion()
    assert deltas and final.choices[0].message.content == deltas


@pytest.mark.parametrize("model", ["base-only", "aligned-only"])
def test_openai_logprobs_on_a_passthrough_model(stack: Stack, model: str) -> None:
    client = sdk(stack)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs and chat.choices[0].logprobs.content
    assert content and len(content[0].top_logprobs) == 3
    completion = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_openai_n_choices(stack: Stack, model: str) -> None:
    chat = sdk(stack).chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, n=2,
                                              temperature=1.0, seed=3)
    assert [choice.index for choice in chat.choices] == [0, 1]


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_openai_batched_prompts(stack: Stack, model: str) -> None:
    completion = sdk(stack).completions.create(model=model, prompt=PROMPTS, max_tokens=8)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]


def test_openai_models_retrieve_and_errors(stack: Stack) -> None:
    client = sdk(stack)
    assert client.models.retrieve("aligned-only").id == "aligned-only"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="nudged", messages=MESSAGES, presence_penalty=0.5)
    assert raised.value.param == "presence_penalty"


# --- langchain-openai -----------------------------------------------------------------------


def chat_openai(stack: Stack, model: str, **settings: Any) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(model=model, base_url=stack.v1, api_key="unused", max_retries=0,
                                       max_tokens=24, **settings)


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_langchain_chat_invoke_stream_batch(stack: Stack, model: str) -> None:
    chat_model = chat_openai(stack, model)
    assert chat_model.invoke(QUESTION).content
    assert "".join(str(chunk.content) for chunk in chat_model.stream(QUESTION))
    answers = chat_model.batch([QUESTION, "How do bees make honey?"])
    assert len(answers) == 2 and all(answer.content for answer in answers)


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
async def test_langchain_chat_astream(stack: Stack, model: str) -> None:
    # Its own client: langchain shares a default one per base URL, bound to the first test's loop.
    async with httpx.AsyncClient() as client:
        chat_model = chat_openai(stack, model, http_async_client=client)
        assert "".join([str(chunk.content) async for chunk in chat_model.astream(QUESTION)])


def weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.mark.parametrize("model", ["nudged", "aligned-only"])
def test_langchain_bind_tools_where_the_proxy_renders_the_chat_is_refused(stack: Stack, model: str) -> None:
    # Chat rendered as a completion could not call tools: a 400 rather than a silent text answer.
    with pytest.raises(openai.BadRequestError) as raised:
        chat_openai(stack, model).bind_tools([weather]).invoke("What is the weather in Paris?")
    assert raised.value.param == "tools"


@pytest.mark.parametrize("model", ["aligned-chat", "nudged-tools"])
def test_langchain_bind_tools_gets_the_upstream_s_tool_call(stack: Stack, model: str) -> None:
    # The simulator calls a function the request names (vLLM's named tool choice).
    tool_model = chat_openai(stack, model).bind_tools([weather], tool_choice="weather")
    question = "What is the weather in Paris?"
    streamed = functools.reduce(operator.add, tool_model.stream(question))
    for answer in (tool_model.invoke(question), streamed):
        calls = [(call["name"], call["args"]) for call in answer.tool_calls]
        assert calls == [("weather", {"city": "simulated"})]


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_langchain_completions_llm_batches_list_prompts(stack: Stack, model: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    # Left at its default batch_size (20): it sends the prompts as one list. No tiktoken call:
    # that only happens with max_tokens=-1 or get_num_tokens, and needs an encoding download.
    llm = langchain_openai.OpenAI(model=model, base_url=stack.v1, api_key="unused", max_retries=0,
                                  max_tokens=8)
    assert all(llm.batch(PROMPTS))
    result = llm.generate(PROMPTS)
    assert [len(generations) for generations in result.generations] == [1, 1]
    assert stack.recorder.exchanges[-1].path == "/v1/completions"


# --- litellm --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> Any:
    # Otherwise its import fetches the model price map from GitHub (three tries, then a fallback).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return pytest.importorskip("litellm")


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_litellm_completion_streamed_and_not(stack: Stack, litellm: Any, model: str) -> None:
    route = {"model": f"openai/{model}", "api_base": stack.v1, "api_key": "unused", "max_tokens": 24}
    assert litellm.completion(messages=MESSAGES, **route).choices[0].message.content
    chunks = litellm.completion(messages=MESSAGES, stream=True, **route)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
def test_litellm_text_completion(stack: Stack, litellm: Any, model: str) -> None:
    answer = litellm.text_completion(model=f"openai/{model}", prompt=PROMPTS[0], api_base=stack.v1,
                                     api_key="unused", max_tokens=8)
    assert answer.choices[0].text


@pytest.mark.parametrize("model", ["nudged", "base-only", "aligned-only"])
async def test_litellm_acompletion(stack: Stack, litellm: Any, model: str) -> None:
    answer = await litellm.acompletion(model=f"openai/{model}", messages=MESSAGES, api_base=stack.v1,
                                       api_key="unused", max_tokens=24)
    assert answer.choices[0].message.content


@pytest.mark.parametrize("model", ["nudged", "base-only"])
def test_openai_tools_are_refused_by_name_and_a_tool_history_is_answered(stack: Stack, model: str) -> None:
    tool: Any = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(stack).chat.completions.create(model=model, messages=MESSAGES, tools=[tool])
    assert raised.value.param == "tools"
    # Without `tools`, a history with a call and its result is rendered as text (README).
    history: list[ChatCompletionMessageParam] = [
        *MESSAGES,
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                               "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    answer = sdk(stack).chat.completions.create(model=model, messages=history, max_tokens=8)
    assert answer.choices[0].message.content


@pytest.mark.parametrize("model", ["aligned-chat", "nudged-tools"])
def test_openai_tool_calls_and_tool_messages_pass_through(stack: Stack, model: str) -> None:
    tool: Any = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    called = sdk(stack).chat.completions.create(model=model, messages=MESSAGES, tools=[tool],
                                                tool_choice="required")
    calls = called.choices[0].message.tool_calls or []
    assert [(call.type, call.function.name) for call in calls] == [("function", "weather")]  # type: ignore[union-attr]
    history: list[ChatCompletionMessageParam] = [
        *MESSAGES, called.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    answer = sdk(stack).chat.completions.create(model="aligned-chat", messages=history, tools=[tool],
                                                max_tokens=8)
    assert answer.choices[0].message.content
