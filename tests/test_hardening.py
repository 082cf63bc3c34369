"""Hostile client input over real sockets: every bad value is an OpenAI 400 naming its field,
and the keep-alive connection stays usable after it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import USER

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "nudged", "messages": [{"role": "user", "content": USER}], **extra}


# Raw JSON text, since Python's json.dumps cannot write a lone surrogate as such, and so that
# NaN goes out exactly as a client could send it.
_BAD_BODIES = [
    (COMPLETIONS, '{"model": "nudged", "prompt": "hi \\ud800"}', "prompt"),
    (CHAT, '{"model": "nudged", "messages": [{"role": "user", "content": "\\udfff x"}]}',
     "messages.0.content"),
    (CHAT, '{"model": "nudged", "messages": [{"role": "user", "content": "hi"}],'
           ' "nudging": {"nudging_prompt": "\\ud800"}}', "nudging.nudging_prompt"),
    (CHAT, '{"model": "nudged\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, '{"model": "base-only", "messages": [{"role": "user", "content": "hi"}],'
           ' "stop": ["\\ud800"]}', "stop.0"),
    (CHAT, '{"model": "nudged", "messages": [{"role": "user", "content": "hi"}],'
           ' "temperature": NaN}', "temperature"),
    (CHAT, '{"model": "base-only", "messages": [{"role": "user", "content": "hi"}],'
           ' "logit_bias": {"5": Infinity}}', "logit_bias.5"),
    (COMPLETIONS, '{"model": "base-only", "prompt": "hi", "top_k": -Infinity}', "top_k"),
]


def _post_raw(client: httpx.Client, endpoint: str, text: str) -> httpx.Response:
    return client.post(endpoint, content=text.encode(), headers={"content-type": "application/json"})


def _client_port(response: httpx.Response) -> int:
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


@pytest.mark.parametrize(("endpoint", "text", "param"), _BAD_BODIES)
def test_unencodable_or_non_finite_input_is_a_400_naming_the_field(
    proxy: str, endpoint: str, text: str, param: str
) -> None:
    with httpx.Client(base_url=proxy) as client:
        response = _post_raw(client, endpoint, text)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        # The same connection answers the next request: the 400 did not break keep-alive.
        again = client.post(CHAT, json=_chat())
        assert again.status_code == 200
        assert _client_port(again) == _client_port(response)


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("stream", 1), ("max_tokens", "5"), ("max_tokens", 5.0), ("n", True),
    ("temperature", "0"), ("top_p", True), ("seed", "1"), ("max_completion_tokens", "5"),
    ("logprobs", "false"), ("stream_options", {"include_usage": "yes"}),
    ("nudging", {"return_provenance": 1}),
])
def test_json_types_are_strict_as_openai(proxy: str, field: str, value: Any) -> None:
    body = _chat(**{field: value}, **({"stream": True} if field == "stream_options" else {}))
    response = httpx.post(proxy + CHAT, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == field


def test_integer_json_numbers_are_valid_floats(proxy: str) -> None:
    response = httpx.post(proxy + CHAT, json=_chat(temperature=1, top_p=1, presence_penalty=0))
    assert response.status_code == 200, response.text
