"""The upstream client against answers recorded from real vLLM 0.32 (tests/fixtures/vllm-0.32/,
recorded on the CPU pair of scripts/vllm-cpu.sh: Gemma 3 270M and SmolLM2-135M-Instruct).

A small server replays the recorded bodies over real HTTP, so these run in a second where the
real-vLLM suite (tests/test_real_vllm.py) needs the servers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nudging_core.upstream import (
    CompletionCall,
    ContextFull,
    ContextOverflow,
    NoChatTemplate,
    UpstreamClient,
)
from nudging_core.upstream.errors import UpstreamError

from .servers import running

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32"


def recorded(name: str) -> tuple[str, int]:
    """A recorded body and its status (curl's trailing `HTTP nnn` line, else 200)."""
    text = (FIXTURES / name).read_text()
    lines = text.rstrip("\n").split("\n")
    if lines[-1].startswith("HTTP "):
        return "\n".join(lines[:-1]).rstrip("\n") + "\n", int(lines[-1].split()[1])
    return text, 200


def replay(name: str, *, stream: bool = False) -> Response:
    body, status = recorded(name)
    return Response(
        body, status_code=status, media_type="text/event-stream" if stream else "application/json"
    )


RENDERED = json.loads(recorded("detokenize_messages_with_template.json")[0])["prompt"]
RENDERED_TOKENS = json.loads(recorded("tokenize_messages_with_template.json")[0])["tokens"]


class RecordedGemma:
    """Gemma 3 270M as vLLM served it: with a template that starts with `{{ bos_token }}`
    (`with_template`), or without any (a base model)."""

    def __init__(self, *, with_template: bool, completion: str = "completions_logprobs5.json") -> None:
        self.with_template = with_template
        self.completion = completion
        self.seen: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", lambda request: replay("models.json")),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ])

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(body)
        if "messages" in body:
            return replay("tokenize_messages_with_template.json" if self.with_template
                          else "tokenize_messages_genprompt.json")
        if body["prompt"] == RENDERED:  # BOS rendered as text, then added again
            return replay("retokenize_rendered_prompt.json")
        if body["prompt"] == RENDERED.removeprefix("<bos>"):
            return JSONResponse({"count": len(RENDERED_TOKENS), "max_model_len": 2048,
                                 "tokens": RENDERED_TOKENS, "token_strs": None})
        return JSONResponse({"error": {"message": "not recorded", "type": "BadRequestError",
                                       "param": None, "code": 400}}, status_code=400)

    async def detokenize(self, request: Request) -> Response:
        tokens = (await request.json())["tokens"]
        if tokens == RENDERED_TOKENS:
            return replay("detokenize_messages_with_template.json")
        if tokens == RENDERED_TOKENS[:1]:
            return JSONResponse({"prompt": "<bos>"})
        return JSONResponse({"error": {"message": "not recorded", "type": "BadRequestError",
                                       "param": None, "code": 400}}, status_code=400)

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(body)
        return replay(self.completion, stream=bool(body.get("stream")))


@pytest.fixture
def gemma_with_template() -> Iterator[tuple[RecordedGemma, str]]:
    server = RecordedGemma(with_template=True)
    with running(server.app()) as url:
        yield server, url


async def test_auto_template_sends_bos_once(gemma_with_template: tuple[RecordedGemma, str]) -> None:
    server, url = gemma_with_template
    client = UpstreamClient(url + "/v1", "gemma3-270m", role="nudging")
    try:
        prompt = await client.render_chat([{"role": "user", "content": "Hi"}])
    finally:
        await client.aclose()
    # vLLM adds BOS to a completions prompt: the rendered `<bos>` text must not come too.
    assert prompt == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


async def test_a_model_without_a_template_is_named() -> None:
    server = RecordedGemma(with_template=False)
    with running(server.app()) as url:
        client = UpstreamClient(url + "/v1", "gemma3-270m", role="nudging")
        try:
            with pytest.raises(NoChatTemplate, match="chat template"):
                await client.render_chat([{"role": "user", "content": "Hi"}])
        finally:
            await client.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_split_utf8_characters_come_whole_on_their_last_token(stream: bool) -> None:
    # SmolLM2 writes " 💖" as three tokens: vLLM 0.32 sends "" for the first two (offsets do
    # not move) and the whole character on the third; the top-k dicts collide on "".
    server = RecordedGemma(with_template=False, completion="completions_emoji_logprobs2.json")
    if stream:
        server.completion = "completions_emoji_logprobs2_stream.txt"
    with running(server.app()) as url:
        client = UpstreamClient(url + "/v1", "smollm2", role="nudging")
        call = CompletionCall(prompt="emoji", max_tokens=6, logprobs=2)
        try:
            if stream:
                async with client.stream(call) as answer:
                    tokens = [token async for token in answer]
            else:
                tokens = list((await client.complete(call)).tokens)
        finally:
            await client.aclose()
    texts = [t.text for t in tokens]
    if stream:
        sent = "".join(json.loads(line[5:])["choices"][0]["text"]
                       for line in recorded(server.completion)[0].splitlines()
                       if line.startswith("data: {") and json.loads(line[5:])["choices"])
        assert "".join(texts) == sent and "\ufffd" not in sent
        assert texts[:3] == ["", "", " 💖"]
    else:
        assert texts == ["", "", " 💖", "", "", " 💐"]
    # The top-1 probability is at least the chosen token's, though the colliding dict says less.
    assert tokens[0].top_logprob == pytest.approx(-0.4561607539653778)


async def test_an_error_event_inside_a_stream_keeps_its_status() -> None:
    server = RecordedGemma(with_template=False, completion="err_stream_logprobs101.txt")
    with running(server.app()) as url:
        client = UpstreamClient(url + "/v1", "smollm2", role="base")
        try:
            with pytest.raises(UpstreamError) as raised:
                async with client.stream(CompletionCall(prompt="Hi", max_tokens=4, logprobs=101)) as answer:
                    [token async for token in answer]
        finally:
            await client.aclose()
    assert raised.value.status_code == 400 and "max allowed: 100" in raised.value.message


async def test_a_full_context_is_told_from_a_prompt_too_long() -> None:
    edge = json.loads((FIXTURES / "context_edge.json").read_text())
    full = edge["prompt_2048_max_tokens_4"].removeprefix("HTTP 400 ")

    def app(body: str) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", lambda request: replay("models.json")),
            Route("/v1/completions", lambda request: Response(body, 400, media_type="application/json"),
                  methods=["POST"]),
        ])

    too_long = json.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 2048 tokens. "
                "However, your prompt contains at least "
                "2049 input tokens, which exceeds this limit even without any output tokens. Please reduce "
                "the length of the input prompt. (parameter=input_tokens, value=2049)",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        }
    )
    for body, error in ((full, ContextFull), (too_long, ContextOverflow)):
        with running(app(body)) as url:
            client = UpstreamClient(url + "/v1", "gemma3-270m", role="base")
            try:
                with pytest.raises(ContextOverflow) as raised:
                    await client.complete(CompletionCall(prompt="x", max_tokens=4))
            finally:
                await client.aclose()
        assert type(raised.value) is error
