"""The official `openai` SDK, unchanged, against a running proxy."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .conftest import NUDGER_PROMPT, USER

EXPECTED = "Sure! The sky is blue because of light. Bye"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": USER}]


def client(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)


def test_sync_chat_and_completion(proxy: str) -> None:
    sdk = client(proxy)
    chat = sdk.chat.completions.create(model="nudged", messages=MESSAGES)
    assert chat.choices[0].message.content == EXPECTED
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    completion = sdk.completions.create(
        model="nudged", prompt=f"{USER}\n", extra_body={"nudging": {"nudging_prompt": NUDGER_PROMPT}}
    )
    assert completion.choices[0].text == EXPECTED
    assert [m.id for m in sdk.models.list()] == [
        "nudged",
        "nudged-auto",
        "ensemble",
        "base-only",
        "aligned-only",
    ]


def test_retrieve_one_model(proxy: str) -> None:
    sdk = client(proxy)
    model = sdk.models.retrieve("aligned-only")
    assert (model.id, model.object) == ("aligned-only", "model")
    assert model == next(m for m in sdk.models.list() if m.id == "aligned-only")
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve("nope")
    assert raised.value.code == "model_not_found"
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "model"


def test_sync_streaming(proxy: str) -> None:
    sdk = client(proxy)
    stream = sdk.chat.completions.create(model="nudged", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == EXPECTED
    completion_stream = sdk.completions.create(
        model="nudged", prompt=f"{USER}\n", stream=True, stream_options={"include_usage": True},
        extra_body={"nudging": {"nudging_prompt": NUDGER_PROMPT}},
    )
    chunks = list(completion_stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == EXPECTED
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_async_chat_streaming_and_not(proxy: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    chat = await sdk.chat.completions.create(model="nudged", messages=MESSAGES)
    assert chat.choices[0].message.content == EXPECTED
    stream = await sdk.chat.completions.create(model="nudged", messages=MESSAGES, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == EXPECTED
    completion = await sdk.completions.create(
        model="nudged", prompt=f"{USER}\n", extra_body={"nudging": {"nudging_prompt": NUDGER_PROMPT}}
    )
    assert completion.choices[0].text == EXPECTED
    await sdk.close()


def test_sdk_raises_on_errors(proxy: str) -> None:
    sdk = client(proxy)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="missing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="nudged", messages=MESSAGES, logit_bias={"1": 1})
    assert "logit_bias" in str(raised.value)
