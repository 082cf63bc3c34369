from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from nudging_core.errors import (
    APIError,
    error_body,
    invalid_request,
    model_not_found,
    unauthorized,
    upstream_failure,
    upstream_unavailable,
)
from nudging_core.jsonio import dump_json
from nudging_core.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    NudgingChunkSource,
    NudgingReport,
    SpanReport,
    UsageInfo,
    parse_request,
    unsupported_fields,
)
from nudging_core.templates import Message, TemplateError, normalize_messages
from nudging_core.types import Piece, Token, WrittenToken
from nudging_core.upstream import ContextOverflow, UpstreamError, UpstreamTimeout
from server.errors import install_error_handlers
from server.responses import ChatShape, TextShape, token_sources

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "Once upon a time"}


def api_error(model: type[Any], body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(model, body)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# --- requests ---------------------------------------------------------------------------------


def test_completion_defaults() -> None:
    request = parse_request(CompletionRequest, COMPLETION)
    assert request.prompts() == ["Once upon a time"]
    assert request.max_tokens is None  # the model's configured default applies
    assert request.n == 1 and request.stream is False and request.echo is False
    assert request.temperature is None and request.top_p is None and request.nudging is None
    assert request.stop_list() == [] and not request.include_usage()
    assert unsupported_fields(request) == []


def test_chat_full_body() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "user", "content": "again", "name": "bob"},
        ],
        "max_tokens": 10,
        "max_completion_tokens": 20,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 2,
        "stop": "\n\n",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "seed": 7,
        "user": "u-1",
        "nudging": {"threshold": 0.3, "lookahead_tokens": 16, "strategy": "paper", "cleanup": True},
    }
    request = parse_request(ChatCompletionRequest, body)
    assert request.requested_max_tokens() == 20
    assert request.stop_list() == ["\n\n"] and request.include_usage()
    assert request.nudging is not None and request.nudging.strategy == "paper"
    assert request.nudging.return_provenance is None
    assert dict(request.messages[1]) == {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert dict(request.messages[2]) == {"role": "assistant", "content": None, "tool_calls": []}
    assert unsupported_fields(request) == []
    # Validated messages are plain dicts, ready for the template code.
    assert normalize_messages(request.messages) == [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", ""),
        Message("user", "again"),
    ]


def test_non_text_parts_validate_and_are_kept() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:,"}, "detail": "low"}
    request = parse_request(
        ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [part]}]}
    )
    assert request.messages[0]["content"] == [part]
    with pytest.raises(TemplateError, match="only text parts"):
        normalize_messages(request.messages)


def test_max_tokens_when_only_legacy_field() -> None:
    assert parse_request(ChatCompletionRequest, {**CHAT, "max_tokens": 5}).requested_max_tokens() == 5


def test_unknown_fields_are_kept_for_passthrough() -> None:
    request = parse_request(CompletionRequest, {**COMPLETION, "top_k": 40, "repetition_penalty": 1.1})
    assert request.model_extra == {"top_k": 40, "repetition_penalty": 1.1}
    assert request.model_dump(exclude_unset=True) == {**COMPLETION, "top_k": 40, "repetition_penalty": 1.1}


def test_explicit_null_means_default() -> None:
    request = parse_request(ChatCompletionRequest, {**CHAT, "n": None, "stream": None, "logprobs": None})
    assert request.n == 1 and request.stream is False and request.logprobs is False


def test_prompts_in_vllms_four_forms() -> None:
    def prompts(prompt: object) -> list[str | tuple[int, ...]]:
        return parse_request(CompletionRequest, {**COMPLETION, "prompt": prompt}).prompts()

    assert prompts("one") == ["one"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [(1, 2, 3)]
    assert prompts([[1, 2], [3]]) == [(1, 2), (3,)]
    malformed: list[object] = [[], [""], [[]], [[1], []], ["a", 1], [-1], [[0, -2]]]
    for prompt in malformed:
        with pytest.raises(APIError) as info:
            prompts(prompt)
        assert info.value.status_code == 400
        assert info.value.param is not None and info.value.param.split(".")[0] == "prompt"


@pytest.mark.parametrize(
    ("model", "patch", "param"),
    [
        (CompletionRequest, {"max_tokens": "lots"}, "max_tokens"),
        (CompletionRequest, {"max_tokens": -1}, "max_tokens"),
        (CompletionRequest, {"n": 0}, "n"),
        (CompletionRequest, {"temperature": 2.5}, "temperature"),
        (CompletionRequest, {"top_p": 0}, "top_p"),
        (CompletionRequest, {"stop": 5}, "stop"),
        (CompletionRequest, {"prompt": 5}, "prompt"),
        (CompletionRequest, {"model": None}, "model"),
        (CompletionRequest, {"stream_options": {"include_usage": True}}, "stream_options"),
        (CompletionRequest, {"nudging": {"threshold": 0}}, "nudging.threshold"),
        (CompletionRequest, {"nudging": {"threshold": 1.5}}, "nudging.threshold"),
        (CompletionRequest, {"nudging": {"lookahead_tokens": 257}}, "nudging.lookahead_tokens"),
        (CompletionRequest, {"nudging": {"strategy": "greedy"}}, "nudging.strategy"),
        (CompletionRequest, {"nudging": "fast"}, "nudging"),
        (ChatCompletionRequest, {"messages": []}, "messages"),
        (ChatCompletionRequest, {"messages": "hi"}, "messages"),
        (ChatCompletionRequest, {"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages.0.content.0.type",
        ),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0",
        ),
        (ChatCompletionRequest, {"max_completion_tokens": -1}, "max_completion_tokens"),
        (ChatCompletionRequest, {"logprobs": "many"}, "logprobs"),
    ],
)
def test_bad_values_name_the_field(model: type[Any], patch: dict[str, Any], param: str) -> None:
    base = COMPLETION if model is CompletionRequest else CHAT
    error = api_error(model, {**base, **patch})
    assert error.param == param
    assert f"'{param}'" in error.message


def test_missing_field() -> None:
    error = api_error(CompletionRequest, {"prompt": "x"})
    assert (error.param, error.message) == ("model", "Missing required parameter: 'model'.")


def test_nudging_extension_rejects_unknown_keys() -> None:
    error = api_error(CompletionRequest, {**COMPLETION, "nudging": {"treshold": 0.3}})
    assert error.param == "nudging.treshold"
    assert error.message == "Unrecognized request argument supplied: 'nudging.treshold'."


def test_body_must_be_an_object() -> None:
    assert api_error(CompletionRequest, [1, 2]).message == "The request body must be a JSON object."


# --- unsupported_fields -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"echo": True}, ["echo"]),
        ({"echo": False, "logprobs": None, "best_of": 1, "suffix": "", "logit_bias": {}}, []),
        ({"logprobs": 0}, ["logprobs"]),
        ({"best_of": 3, "suffix": "end", "logit_bias": {"50256": -100}}, ["suffix", "best_of", "logit_bias"]),
        ({"presence_penalty": 0.0, "frequency_penalty": 0}, []),
        ({"presence_penalty": 0.5, "frequency_penalty": -1}, ["presence_penalty", "frequency_penalty"]),
        # vLLM's sampling fields, at their defaults and not.
        ({"top_k": -1, "min_p": 0, "repetition_penalty": 1.0, "length_penalty": 1, "ignore_eos": False,
          "min_tokens": 0, "stop_token_ids": [], "use_beam_search": False, "prompt_logprobs": None}, []),
        ({"ignore_eos": True, "min_tokens": 5}, ["ignore_eos", "min_tokens"]),
        ({"top_k": 40, "min_p": 0.1, "repetition_penalty": 1.1}, ["top_k", "min_p", "repetition_penalty"]),
        ({"prompt_logprobs": 0, "stop_token_ids": [2]}, ["stop_token_ids", "prompt_logprobs"]),
        ({"structured_outputs": {"regex": "a+"}, "guided_json": {"type": "object"}},
         ["structured_outputs", "guided_json"]),
    ],
)
def test_unsupported_completion_fields(patch: dict[str, Any], expected: list[str]) -> None:
    assert unsupported_fields(parse_request(CompletionRequest, {**COMPLETION, **patch})) == expected


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"tools": [], "tool_choice": "none", "functions": [], "function_call": "auto"}, []),
        ({"tools": [TOOL], "tool_choice": "auto"}, ["tools"]),
        ({"tool_choice": "required"}, ["tool_choice"]),
        ({"function_call": {"name": "f"}}, ["function_call"]),
        ({"response_format": {"type": "text"}, "modalities": ["text"]}, []),
        ({"response_format": {"type": "json_object"}}, ["response_format"]),
        ({"logprobs": False, "top_logprobs": 0}, []),
        ({"logprobs": True, "top_logprobs": 2}, ["logprobs", "top_logprobs"]),
        ({"audio": {"voice": "alloy"}, "modalities": ["text", "audio"]}, ["audio", "modalities"]),
        ({"prediction": {"type": "content", "content": "x"}}, ["prediction"]),
        ({"reasoning_effort": "low"}, ["reasoning_effort"]),
        ({"parallel_tool_calls": True, "store": True}, []),
        ({"top_k": 0, "repetition_penalty": None, "skip_special_tokens": False}, []),
        ({"repetition_penalty": 1.2, "ignore_eos": True}, ["repetition_penalty", "ignore_eos"]),
        ({"bad_words": ["x"], "allowed_token_ids": [1, 2]}, ["allowed_token_ids", "bad_words"]),
        # vLLM's chat fields: the nudged model renders its own configured template.
        ({"add_generation_prompt": True, "continue_final_message": False, "echo": False}, []),
        ({"add_generation_prompt": False, "chat_template": "{{ x }}"},
         ["add_generation_prompt", "chat_template"]),
        ({"continue_final_message": True, "chat_template_kwargs": {"enable_thinking": False}, "echo": True},
         ["echo", "continue_final_message", "chat_template_kwargs"]),
    ],
)
def test_unsupported_chat_fields(patch: dict[str, Any], expected: list[str]) -> None:
    assert unsupported_fields(parse_request(ChatCompletionRequest, {**CHAT, **patch})) == expected


# --- responses ----------------------------------------------------------------------------------


def test_completion_response_shape() -> None:
    response = CompletionResponse(
        model="m",
        choices=[CompletionChoice(index=0, text="Hello", finish_reason="stop")],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )
    data = json.loads(response.model_dump_json())
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert isinstance(data["created"], int)
    # vLLM's keys: `stop_reason` is null unless a stop string ended the choice.
    assert data["choices"] == [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None}]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chat_response_with_nudging_report() -> None:
    report = NudgingReport(
        spans=[SpanReport(text="Sure", source="nudging"), SpanReport(text=", here.", source="base")],
        tokens={"base": 3, "nudging": 1},
        rounds=2,
        upstream_requests={"base": 4, "nudging": 2},
        stop_reason="nudger_stop",
    )
    response = ChatCompletionResponse(
        id="chatcmpl-x",
        model="m",
        choices=[
            ChatCompletionChoice(
                index=0,
                message=ChatCompletionMessage(content="Sure, here."),
                finish_reason="stop",
                nudging=report,
            )
        ],
        usage=UsageInfo(prompt_tokens=1, completion_tokens=4, total_tokens=5),
    )
    data = response.model_dump()
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Sure, here.", "refusal": None}
    assert choice["logprobs"] is None
    assert choice["nudging"]["spans"] == [
        {"text": "Sure", "source": "nudging"},
        {"text": ", here.", "source": "base"},
    ]
    assert choice["nudging"]["stop_reason"] == "nudger_stop"


def test_chat_chunks_keep_nulls_and_drop_unrequested_keys() -> None:
    first = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    last = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(), finish_reason="length")],
    )
    assert json.loads(first.model_dump_json())["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    last_data = json.loads(last.model_dump_json())
    assert last_data["object"] == "chat.completion.chunk"
    assert last_data["choices"][0]["delta"] == {}
    assert "usage" not in last_data  # not asked for


def test_stream_usage_null_only_when_asked() -> None:
    asked = CompletionStreamResponse(
        model="m", choices=[CompletionStreamChoice(index=0, text="a")], usage=None
    )
    assert asked.model_dump()["usage"] is None
    assert "nudging" not in asked.model_dump()["choices"][0]
    usage_chunk = CompletionStreamResponse(
        model="m", choices=[], usage=UsageInfo(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    )
    assert usage_chunk.model_dump()["choices"] == []
    assert usage_chunk.model_dump()["usage"]["total_tokens"] == 2
    assert usage_chunk.model_dump()["id"].startswith("cmpl-")


def test_model_list() -> None:
    data = ModelList(data=[ModelCard(id="llama-nudged", created=1)]).model_dump()
    assert data == {
        "object": "list",
        "data": [{"id": "llama-nudged", "object": "model", "created": 1, "owned_by": "nudging-proxy"}],
    }


# --- errors -------------------------------------------------------------------------------------


def test_error_helpers() -> None:
    assert error_body(APIError(400, "m")) == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }
    assert invalid_request("bad", "n").to_dict()["error"]["param"] == "n"
    missing = model_not_found("gpt-9")
    assert (missing.status_code, missing.type, missing.code, missing.param) == (
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    )
    assert unauthorized().status_code == 401 and unauthorized().type == "authentication_error"
    down = upstream_unavailable(
        "base", "connection refused to http://10.0.0.5:8000/v1/completions", status_code=503
    )
    assert down.status_code == 503 and down.type == "upstream_error"
    assert "10.0.0.5" not in down.message and "base" in down.message
    with pytest.raises(ValueError):
        upstream_unavailable("base", "x", status_code=500)
    assert "http://" not in APIError(500, "failed at https://secret.internal/x").message
    assert error_body(missing) == missing.to_dict()


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UpstreamTimeout("base", "timed out"), 504, "upstream_timeout"),
        (UpstreamError("nudging", "unreachable (ConnectError)"), 502, "upstream_error"),
        (
            UpstreamError("base", "HTTP 500: boom at http://10.1.2.3:8000/v1", status_code=500),
            502,
            "upstream_error",
        ),
        (UpstreamError("base", "HTTP 503: overloaded", status_code=503), 503, "upstream_unavailable"),
        (UpstreamError("base", "HTTP 401: bad key", status_code=401), 502, "upstream_error"),
        (UpstreamError("base", "HTTP 400: top_k must be -1 or positive", status_code=400), 400, None),
        (
            ContextOverflow("base", "maximum context length is 4096 tokens", status_code=400),
            400,
            "context_length_exceeded",
        ),
    ],
)
def test_upstream_failure(error: UpstreamError, status: int, code: str | None) -> None:
    api = upstream_failure(error)
    assert (api.status_code, api.code) == (status, code)
    assert error.role in api.message and "10.1.2.3" not in api.message


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> dict[str, Any]:
        prompt = request.prompts()[0]
        if not isinstance(prompt, str):
            raise invalid_request("this route reads text prompts only", "prompt")
        return {"prompt": prompt}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest) -> dict[str, Any]:
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail at http://vllm-base:8000/v1")

    @app.get("/api-error")
    async def api_error_route() -> None:
        raise model_not_found("nope")

    @app.get("/template-error")
    async def template_error() -> None:
        raise TemplateError("the last message must be a user message, not assistant")

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(418, "short and stout")

    return TestClient(app, raise_server_exceptions=False)


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_json(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b'{"model": "m",', headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert error["message"] == "Could not parse the request body as JSON."
    assert error["type"] == "invalid_request_error"


def test_not_json_content_type(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=json.dumps(COMPLETION).encode(), headers={"content-type": "text/plain"}
    )
    assert "Content-Type: application/json" in assert_openai_error(response, 400)["message"]


def test_wrong_type_names_field(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": "ten"}), 400)
    assert error["param"] == "max_tokens"
    assert "max_tokens" in error["message"]


def test_bad_message_part(client: TestClient) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0.content.0.text"


def test_unknown_top_level_field_accepted(client: TestClient) -> None:
    response = client.post("/v1/completions", json={**COMPLETION, "some_future_field": {"a": 1}})
    assert response.status_code == 200 and response.json() == {"prompt": "Once upon a time"}


def test_route_raised_api_error(client: TestClient) -> None:
    response = client.post("/v1/completions", json={**COMPLETION, "prompt": [1, 2]})
    assert assert_openai_error(response, 400)["param"] == "prompt"
    assert assert_openai_error(client.get("/api-error"), 404)["code"] == "model_not_found"


def test_template_error_is_400(client: TestClient) -> None:
    error = assert_openai_error(client.get("/template-error"), 400)
    assert error["param"] == "messages" and "user message" in error["message"]


def test_unknown_route_and_method(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/nope"), 404)
    assert error["message"] == "Invalid URL (POST /v1/nope)"
    assert error["type"] == "invalid_request_error"
    response = client.get("/v1/completions")
    assert assert_openai_error(response, 405)["type"] == "invalid_request_error"
    assert response.headers["allow"] == "POST"


def test_http_exception_detail(client: TestClient) -> None:
    assert assert_openai_error(client.get("/teapot"), 418)["message"] == "short and stout"


def test_unexpected_exception_is_generic_500(client: TestClient) -> None:
    response = client.get("/boom")
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error"
    assert (
        "secret" not in response.text
        and "vllm-base" not in response.text
        and "RuntimeError" not in response.text
    )


TEXT_LOGPROBS = {"tokens": [" hi"], "token_logprobs": [-0.25], "top_logprobs": [{" hi": -0.25, " yo": -1.5}],
                 "text_offset": [0]}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize("with_provenance", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("piece", [
    Piece(" hi", "base", (3,)),
    Piece("", "nudging", (), logprobs=TEXT_LOGPROBS),
    Piece(" hi", "nudging", (3,), logprobs=TEXT_LOGPROBS,
          written=(WrittenToken(Token(" hi", -0.25, -0.25), base_top_prob=0.4),)),
], ids=["text", "logprobs-only", "written"])
def test_a_text_chunk_is_the_response_models_chunk(
    chat: bool, with_provenance: bool, include_usage: bool, piece: Piece
) -> None:
    # Text chunks are built by hand (they are sent per token); every other chunk goes through
    # the response models. Both must give the same chunk, keys and nulls alike.
    shape: ChatShape | TextShape = TextShape(model="m", with_provenance=with_provenance,
                                             include_usage=include_usage)
    if chat:
        shape = ChatShape(model="m", with_provenance=with_provenance, include_usage=include_usage,
                          top_logprobs=2)
    source = (NudgingChunkSource(source=piece.source, token_sources=token_sources([piece]))
              if with_provenance else None)
    by_models = shape.chunk(3, piece.text, report=source, logprobs=shape.logprobs([piece]))
    by_hand = shape.text_chunk(3, piece)
    assert by_hand == by_models
    assert list(by_hand) == list(by_models)
    assert list(by_hand["choices"][0]) == list(by_models["choices"][0])
    assert json.loads(dump_json(by_hand)) == by_models
