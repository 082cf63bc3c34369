"""The simulator's ``POST /v1/chat/completions``, small: enough for the proxy's chat passthrough.

The messages are rendered as ChatML (whose markers the simulated models read, see
:mod:`.prompts`) and the rendered text is generated as a completion. A request that forces a
tool call (``tool_choice`` naming a function, or ``"required"``) is answered with a call of
that function (the first tool for ``"required"``), and one with a ``response_format`` of
``json_object`` or ``json_schema`` with a JSON text: both deterministic, built from the tool's
parameters or the schema, as a stand-in for vLLM's tool parsing and structured outputs.

The answers have the shape of vLLM's (``ChatCompletionResponse`` and
``ChatCompletionStreamResponse`` in ``vllm/entrypoints/openai/protocol.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from ..openai_api import ApiError, sse, usage_block

# The fields of a chat request that mean the same in a completion request.
COMPLETION_FIELDS = ("model", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n")


def _render(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    blocks = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError("each message needs a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        if message.get("tool_calls"):
            content = (content or "") + json.dumps(message["tool_calls"])
        blocks.append(f"<|im_start|>{message['role']}\n{content or ''}<|im_end|>\n")
    return "".join(blocks) + "<|im_start|>assistant\n"


def completion_body(body: Any) -> dict[str, Any]:
    """The completion request that writes the answer to the chat request `body`."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if body.get("logprobs"):
        raise ApiError("the simulator's chat endpoint serves no logprobs", param="logprobs")
    completion = {key: body[key] for key in COMPLETION_FIELDS if key in body}
    completion["prompt"] = _render(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        completion["max_tokens"] = max_tokens
    return completion


def example_value(schema: Any) -> Any:
    """A value that fits the JSON schema `schema` (the simple parts of it), always the same."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: example_value(sub) for name, sub in properties.items()}
    return {"string": "simulated", "integer": 0, "number": 0, "boolean": False, "array": []}.get(
        kind if isinstance(kind, str) else "", None)


def forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function a request makes the model call, if it makes it call one."""
    tools: list[dict[str, Any]] = [tool.get("function", {}) for tool in body.get("tools") or []
                                   if isinstance(tool, dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        named = next((tool for tool in tools if tool.get("name") == name), None)
        if named is None:
            raise ApiError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return named
    if choice == "required":
        if not tools:
            raise ApiError("tool_choice 'required' needs tools", param="tool_choice")
        return tools[0]
    return None


def structured_text(body: dict[str, Any]) -> str | None:
    """The JSON text answering a `response_format` of json_object or json_schema."""
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return json.dumps({"answer": "simulated"})
    if kind == "json_schema":
        schema = (response_format or {}).get("json_schema") or {}
        return json.dumps(example_value(schema.get("schema")))
    return None


def tool_call(function: dict[str, Any]) -> dict[str, Any]:
    name = str(function.get("name"))
    arguments = json.dumps(example_value(function.get("parameters")) or {})
    digest = hashlib.sha256((name + arguments).encode()).hexdigest()[:24]
    return {"id": f"chatcmpl-tool-{digest}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ChatReply:
    """A chat answer's body and SSE chunks, in vLLM's shapes (one choice)."""

    def __init__(self, name: str, system_fingerprint: str | None) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.name = name
        self.system_fingerprint = system_fingerprint

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name,
                "choices": choices}

    def body(self, content: str, tool_calls: list[dict[str, Any]], finish_reason: str | None,
             stop_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        message = {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "tool_calls": tool_calls,
                   "reasoning_content": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": stop_reason}
        return {**self._envelope("chat.completion", [choice]), "service_tier": None,
                "system_fingerprint": self.system_fingerprint,
                "usage": usage_block(prompt_tokens, completion_tokens), "prompt_logprobs": None,
                "kv_transfer_params": None}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              stop_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return sse(self._envelope("chat.completion.chunk", [choice]))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        chunk = self._envelope("chat.completion.chunk", [])
        chunk["usage"] = usage_block(prompt_tokens, completion_tokens)
        return sse(chunk)
