"""Schema-driven fuzzing of both endpoints: no 5xx and no hang, whatever the body.

Bodies come from the request models' JSON schemas (valid values of every field), with fields
swapped for arbitrary JSON, whole bodies of arbitrary JSON, and bytes that are not JSON. The
proxy runs in front of the simulator pair at zero latency (it answers any prompt), so a 5xx
can only be the proxy's own fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from nudging_core.config import parse_config
from nudging_core.protocol import ChatCompletionRequest, CompletionRequest
from server.app import create_app
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

MODELS = ["nudged", "nudged-paper", "base", "aligned"]
EXAMPLES_PER_ENDPOINT = 300
Schema = dict[str, Any]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _integers(schema: Schema) -> st.SearchStrategy[int]:
    low, high = schema.get("minimum"), schema.get("maximum")
    start = low if low is not None else -8
    # Often small values a generation can afford, else anything the schema allows.
    small = st.integers(start, start + 8 if high is None else min(start + 8, high))
    return small | st.integers(low, high)


def _numbers(schema: Schema) -> st.SearchStrategy[float]:
    return st.floats(
        schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum"),
        exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False,
    )


def from_schema(schema: Schema, defs: dict[str, Schema]) -> st.SearchStrategy[Any]:
    """Values valid for a (pydantic-generated) JSON schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return st.text(max_size=40)
    if kind == "integer":
        return _integers(schema)
    if kind == "number":
        return _numbers(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=max(4, schema.get("minItems", 0)))
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return st.dictionaries(st.text(max_size=10), from_schema(extra, defs), max_size=3)
        properties = {name: from_schema(sub, defs) for name, sub in schema.get("properties", {}).items()}
        required = {name: properties[name] for name in schema.get("required", ())}
        optional = sorted(set(properties) - set(required))
        # A few optional fields at a time, as clients send them (all at once, some field a
        # nudged model refuses would nearly always be among them).
        chosen = st.lists(st.sampled_from(optional), max_size=3, unique=True) if optional else st.just([])
        return chosen.flatmap(
            lambda names: st.fixed_dictionaries({**required, **{name: properties[name] for name in names}})
        )
    return json_values


def _turn(role: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"role": role, "content": st.text(max_size=30)})


# Half the valid bodies take these values, as real clients send them; schema-valid values alone
# are mostly conversations no template can render (a lone tool message, say).
TYPICAL: dict[type[BaseModel], dict[str, st.SearchStrategy[Any]]] = {
    CompletionRequest: {"prompt": st.text(max_size=40)},
    ChatCompletionRequest: {"messages": st.tuples(
        st.lists(_turn(st.sampled_from(["system", "user", "assistant"])), max_size=3), _turn(st.just("user"))
    ).map(lambda t: [*t[0], t[1]])},
}


def bodies(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    schema = model.model_json_schema()
    valid = from_schema(schema, schema.get("$defs", {}))
    typical: st.SearchStrategy[dict[str, Any]] = st.just({}) | st.fixed_dictionaries(TYPICAL[model])
    named = st.tuples(valid, typical, st.sampled_from([*MODELS, "unknown"])).map(
        lambda t: {**t[0], **t[1], "model": t[2]}
    )
    field_names = st.sampled_from([*schema["properties"], "unknown_field"])
    mutated = st.tuples(named, field_names, json_values).map(lambda t: {**t[0], t[1]: t[2]})
    valid_json, mutated_json, any_json = (
        strategy.map(lambda body: json.dumps(body).encode()) for strategy in (named, mutated, json_values)
    )
    # 6 in 10 valid bodies, 2 with one field of any JSON, 1 of any JSON, 1 not JSON.
    weighted = [valid_json] * 6 + [mutated_json] * 2 + [any_json, st.binary(max_size=60)]
    return st.sampled_from(weighted).flatmap(lambda strategy: strategy)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with ExitStack() as stack:
        base = stack.enter_context(running(create_simulator("base", time_scale=0)))
        aligned = stack.enter_context(running(create_simulator("aligned", time_scale=0)))
        base_up = {"url": base + "/v1", "model": "base"}
        aligned_up = {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}
        budget = {"default_max_tokens": 8, "max_tokens_limit": 32}
        config = parse_config({"server": {"limits": {"max_n": 3}}, "models": [
            {"name": "nudged", "base": base_up, "nudging": aligned_up, **budget},
            {"name": "nudged-paper", "strategy": "paper", "base": base_up, "nudging": aligned_up, **budget},
            {"name": "base", "method": "base_only", "base": base_up, **budget},
            {"name": "aligned", "method": "nudging_only", "nudging": aligned_up, **budget},
        ]})
        proxy = stack.enter_context(running(create_app(config)))
        # The read timeout is the hang detector: every answer here takes well under a second.
        yield stack.enter_context(httpx.Client(base_url=proxy, timeout=httpx.Timeout(60, connect=10)))


def check(client: httpx.Client, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"], response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        data = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]", response.text
        assert not any('"error"' in line[:12] for line in data), (body, response.text)
    else:
        assert response.json()["choices"], response.text


fuzz_settings = settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@fuzz_settings
@given(body=bodies(CompletionRequest))
def test_completions(client: httpx.Client, body: bytes) -> None:
    check(client, "/v1/completions", body)


@fuzz_settings
@given(body=bodies(ChatCompletionRequest))
def test_chat_completions(client: httpx.Client, body: bytes) -> None:
    check(client, "/v1/chat/completions", body)
