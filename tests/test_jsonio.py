"""The JSON of the per-token path keeps values as the standard library would."""

from __future__ import annotations

import json
import math

import pytest

from nudging_core.jsonio import dump_json, load_json


@pytest.mark.parametrize("text", [
    '{"tokens": [18446744073709551616, 9223372036854775808, 5]}',  # token ids past 64 bits stay exact
    '{"logprob": -0.6949604749679565, "tiny": 1e-05, "text": "\\u00e9\\u2028 ok"}',
    '{"choices": [], "usage": null, "ok": true}',
])
def test_what_is_read_is_what_the_standard_library_reads(text: str) -> None:
    assert load_json(text.encode()) == json.loads(text)
    assert load_json(dump_json(load_json(text))) == json.loads(text)


def test_non_finite_numbers_and_lone_surrogates_are_read_and_written_as_python_does() -> None:
    value = load_json(b'{"a": NaN, "b": -Infinity, "c": "\\ud800"}')
    assert math.isnan(value["a"]) and value["b"] == -math.inf and value["c"] == "\ud800"
    written = dump_json(value)
    assert written.startswith(b'{"a":NaN,"b":-Infinity,')
    assert json.loads(written)["c"] == "\ud800"  # escaped: UTF-8 cannot carry it


def test_what_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_json(b'{"a": 1')
