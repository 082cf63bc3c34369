"""The proxy's HTTP API over real sockets, against scripted upstreams: shapes and errors."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse

from nudging_core.config import parse_config
from server.app import create_app
from server.routes import READY_CACHE_SECONDS

from .conftest import BASE_PROMPT, NUDGER_PROMPT, USER
from .servers import running


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "nudged", "messages": [{"role": "user", "content": USER}], **extra}


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_completion_shape_and_provenance(proxy: str) -> None:
    response = httpx.post(proxy + "/v1/chat/completions", json=chat_body(nudging={"return_provenance": True}))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Sure! The sky is blue because of light. Bye",
        "refusal": None,  # OpenAI's schema requires the key
    }
    assert choice["finish_reason"] == "stop"
    report = choice["nudging"]
    assert [s["source"] for s in report["spans"]] == ["nudging", "base", "nudging"]
    assert report["spans"][1]["text"] == " sky is blue because of"
    assert report["stop_reason"] == "nudging_model_stop"
    assert body["usage"]["completion_tokens"] == report["tokens"]["base"] + report["tokens"]["nudging"]
    assert body["usage"]["prompt_tokens"] == len(BASE_PROMPT)  # the scripted tokenizer counts characters


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_stream_without_usage_has_no_usage_key(proxy: str, endpoint: str) -> None:
    body = chat_body() if "chat" in endpoint else {"model": "nudged", "prompt": BASE_PROMPT,
                                                   "nudging": {"nudging_prompt": NUDGER_PROMPT}}
    with httpx.stream("POST", proxy + endpoint, json={**body, "stream": True}) as response:
        chunks = sse_events(response)[:-1]
    assert chunks and all("usage" not in chunk for chunk in chunks)


def test_provenance_only_when_asked(proxy: str) -> None:
    choice = httpx.post(proxy + "/v1/chat/completions", json=chat_body()).json()["choices"][0]
    assert "nudging" not in choice


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_stream_matches_non_stream(proxy: str, endpoint: str) -> None:
    body = chat_body() if "chat" in endpoint else {"model": "nudged", "prompt": BASE_PROMPT,
                                                   "nudging": {"nudging_prompt": NUDGER_PROMPT}}
    whole = httpx.post(proxy + endpoint, json=body).json()
    with httpx.stream("POST", proxy + endpoint, json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    content = chunks[:-1]
    # Asked for usage: every chunk before the usage chunk says `"usage": null`, as OpenAI's do.
    assert all("usage" in chunk and chunk["usage"] is None for chunk in content)
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    if "chat" in endpoint:
        assert content[0]["choices"][0]["delta"]["role"] == "assistant"
        assert content[0]["object"] == "chat.completion.chunk"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in content)
        assert text == whole["choices"][0]["text"]


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_chunks_name_the_model_that_wrote_them(proxy: str, endpoint: str) -> None:
    body: dict[str, Any] = chat_body() if "chat" in endpoint else {"model": "nudged", "prompt": BASE_PROMPT}
    options: dict[str, Any] = {} if "chat" in endpoint else {"nudging_prompt": NUDGER_PROMPT}
    body["nudging"] = {**options, "return_provenance": True}
    with httpx.stream("POST", proxy + endpoint, json={**body, "stream": True}) as response:
        chunks = [event for event in sse_events(response) if event != "[DONE]"]
    *texts, last = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    written = [(c["delta"].get("content", "") if "delta" in c else c["text"], c["nudging"]) for c in texts
               if (c["delta"].get("content") if "delta" in c else c["text"])]
    assert written and all(set(source) == {"source"} for _, source in written)
    merged: list[dict[str, str]] = []
    for text, source in written:
        if merged and merged[-1]["source"] == source["source"]:
            merged[-1]["text"] += text
        else:
            merged.append({"text": text, "source": source["source"]})
    assert merged == last["nudging"]["spans"]
    # Without provenance asked for, text chunks carry no extension.
    plain_body = {**body, "stream": True, "nudging": options}
    with httpx.stream("POST", proxy + endpoint, json=plain_body) as response:
        plain = [event for event in sse_events(response) if event != "[DONE]"]
    assert not any("nudging" in chunk["choices"][0] for chunk in plain if chunk["choices"])


def test_no_usage_chunk_unless_asked(proxy: str) -> None:
    with httpx.stream("POST", proxy + "/v1/chat/completions", json=chat_body(stream=True)) as response:
        events = sse_events(response)
    assert all(event == "[DONE]" or event["choices"] for event in events)


def test_max_tokens_is_exact(proxy: str) -> None:
    body = httpx.post(proxy + "/v1/chat/completions", json=chat_body(max_tokens=4)).json()
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Sure! The sky"


def test_stop_string_across_pieces(proxy: str) -> None:
    body = httpx.post(proxy + "/v1/chat/completions", json=chat_body(stop=["The sky"])).json()
    assert body["choices"][0]["message"]["content"] == "Sure! "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["stop_reason"] == "The sky"  # vLLM's: the stop string that matched
    body = httpx.post(proxy + "/v1/chat/completions", json=chat_body(stop="of light")).json()
    assert body["choices"][0]["message"]["content"] == "Sure! The sky is blue because "
    answer = httpx.post(proxy + "/v1/chat/completions", json=chat_body()).json()
    assert answer["choices"][0]["stop_reason"] is None  # the aligned model stopped


def test_passthrough_models(proxy: str) -> None:
    base = httpx.post(proxy + "/v1/chat/completions",
                      json={"model": "base-only", "messages": [{"role": "user", "content": USER}]}).json()
    assert base["choices"][0]["message"]["content"] == "Hmm, well"
    aligned = httpx.post(proxy + "/v1/completions",
                         json={"model": "aligned-only", "prompt": NUDGER_PROMPT, "max_tokens": 3}).json()
    assert aligned["choices"][0]["text"] == "Sure! The"
    assert aligned["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("combined", ["nudged", "ensemble"])
@pytest.mark.parametrize(("name", "value"), [
    ("logit_bias", {"1": 5}), ("ignore_eos", True), ("min_tokens", 2), ("repetition_penalty", 1.2),
    ("frequency_penalty", 0.5), ("top_k", 5),
])
def test_passthrough_forwards_fields_a_combining_model_rejects(
    proxy: str, combined: str, name: str, value: Any
) -> None:
    response = httpx.post(proxy + "/v1/completions",
                          json={"model": "base-only", "prompt": BASE_PROMPT, name: value})
    assert response.status_code == 200
    response = httpx.post(proxy + "/v1/completions",
                          json={"model": combined, "prompt": BASE_PROMPT, name: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == name
    assert name in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "nudged", "messages": "hello"}, 400, "messages"),
        (
            {"model": "nudged", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            400,
            "max_tokens",
        ),
        ({"model": "nudged", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        (
            {"model": "nudged", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
            400,
            "max_tokens",
        ),
        (
            {
                "model": "nudged",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            400,
            "tools",
        ),
        (
            {
                "model": "nudged",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
        ),
        (
            {"model": "nudged", "messages": [{"role": "user", "content": "x"}], "nudging": {"bogus": 1}},
            400,
            "nudging.bogus",
        ),
        (
            {"model": "nudged", "messages": [{"role": "user", "content": "x"}], "nudging": {"threshold": 2}},
            400,
            "nudging.threshold",
        ),
    ],
)
def test_bad_requests(proxy: str, body: dict[str, Any], status: int, param: str) -> None:
    response = httpx.post(proxy + "/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]


def test_malformed_json(proxy: str) -> None:
    response = httpx.post(proxy + "/v1/completions", content=b'{"model": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(proxy: str) -> None:
    response = httpx.post(proxy + "/v1/chat/completions", json=chat_body(some_vendor_field={"x": 1}))
    assert response.status_code == 200


def test_models_health_ready(proxy: str) -> None:
    models = httpx.get(proxy + "/v1/models").json()
    assert [card["id"] for card in models["data"]] == ["nudged", "nudged-auto", "ensemble", "base-only",
                                                        "aligned-only"]
    assert httpx.get(proxy + "/health").json() == {"status": "ok"}
    ready = httpx.get(proxy + "/ready")
    assert ready.status_code == 200 and all(ready.json()["upstreams"].values())


def test_a_model_named_with_a_slash_is_retrieved() -> None:
    config = parse_config({"models": [
        {"name": "org/model", "method": "base_only",
         "base": {"url": "http://127.0.0.1:9/v1", "model": "b"}}]})
    with running(create_app(config)) as proxy_url:
        card = httpx.get(proxy_url + "/v1/models/org/model").json()
        assert card["id"] == "org/model" and card["object"] == "model"
        assert httpx.get(proxy_url + "/v1/models/org%2Fmodel").json() == card
        missing = httpx.get(proxy_url + "/v1/models/org/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_upstream_down_is_a_clear_5xx() -> None:
    config = parse_config({"models": [
        {"name": "m", "base": {"url": "http://127.0.0.1:9/v1", "model": "b"},
         "nudging": {"url": "http://127.0.0.1:9/v1", "model": "n", "chat_template": "chatml"}}]})
    with running(create_app(config)) as proxy_url:
        response = httpx.post(proxy_url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "x"}]})
        assert response.status_code == 502
        error = response.json()["error"]
        assert "nudging" in error["message"] and "127.0.0.1" not in error["message"]
        with httpx.stream("POST", proxy_url + "/v1/chat/completions", json={"model": "m", "stream": True,
                          "messages": [{"role": "user", "content": "x"}]}) as streamed:
            assert streamed.status_code == 502
        assert httpx.get(proxy_url + "/ready").status_code == 503


def test_auto_template_is_rendered_by_the_upstream(proxy: str) -> None:
    # The `nudged-auto` model asks the aligned upstream to render its chat template.
    auto = httpx.post(proxy + "/v1/chat/completions",
                      json={"model": "nudged-auto", "messages": [{"role": "user", "content": USER}]}).json()
    builtin = httpx.post(proxy + "/v1/chat/completions", json=chat_body()).json()
    assert auto["choices"][0]["message"]["content"] == builtin["choices"][0]["message"]["content"]


def test_ready_asks_the_upstreams_at_most_once_a_second() -> None:
    asked: list[str] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        asked.append(scope["path"])
        await JSONResponse({"object": "list", "data": [{"id": "b", "object": "model"}]})(scope, receive, send)

    with running(upstream) as upstream_url:
        config = parse_config({"models": [
            {"name": "m", "method": "base_only", "base": {"url": upstream_url + "/v1", "model": "b",
                                                          "dialect": "vllm"}}]})
        with running(create_app(config)) as proxy_url, httpx.Client(base_url=proxy_url) as client:
            started = time.monotonic()
            answers = [client.get("/ready") for _ in range(10)]
            took = time.monotonic() - started
            assert took < READY_CACHE_SECONDS, took
            assert [answer.status_code for answer in answers] == [200] * 10
            assert asked == ["/v1/models"]  # one check, shared by the next nine
            time.sleep(READY_CACHE_SECONDS)
            assert client.get("/ready").status_code == 200
            assert asked == ["/v1/models"] * 2
