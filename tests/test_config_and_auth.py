"""Config validation names the bad field; optional API keys guard the API."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from nudging_core.config import ConfigError, load_config, parse_config
from server.app import create_app

from .servers import running

UPSTREAM = {"url": "http://127.0.0.1:9/v1", "model": "m"}
NUDGER = {**UPSTREAM, "chat_template": "chatml"}


def config_error(data: object) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    return str(raised.value)


def test_shipped_configs_load() -> None:
    for path in Path("configs").glob("*.yaml"):
        assert load_config(path).models


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"models": []}, "models"),
        ({"models": [{"name": "a", "base": UPSTREAM}]}, "needs the 'nudging' upstream"),
        ({"models": [{"name": "a", "base": UPSTREAM, "nudging": UPSTREAM}]}, "chat_template"),
        ({"models": [{"name": "a", "base": UPSTREAM, "nudging": {**NUDGER, "chat_template": "nope"}}]},
         "models.0.nudging.chat_template"),
        ({"models": [{"name": "a", "base": {**UPSTREAM, "url": "vllm:8000"}, "nudging": NUDGER}]},
         "models.0.base.url"),
        ({"models": [{"name": "a", "base": UPSTREAM, "nudging": NUDGER, "threshold": 1.5}]},
         "models.0.threshold"),
        ({"models": [{"name": "a", "base": UPSTREAM, "nudging": NUDGER, "stratgy": "fast"}]},
         "models.0.stratgy"),
        ({"models": [{"name": "a", "method": "base_only", "base": UPSTREAM},
                     {"name": "a", "method": "base_only", "base": UPSTREAM}]}, "duplicate model names: a"),
        ({"models": [{"name": "a", "method": "base_only", "base": {**UPSTREAM, "max_event_bytes": 100}}]},
         "models.0.base.max_event_bytes"),
        ({"models": [{"name": "a", "method": "base_only", "base": {**UPSTREAM, "max_answer_bytes": "16M"}}]},
         "models.0.base.max_answer_bytes"),
        ({"models": [{"name": "a", "method": "base_only", "base": {**UPSTREAM, "timeouts": {"read": 0}}}]},
         "models.0.base.timeouts.read"),
        ({"models": [{"name": "a", "method": "base_only", "base": {**UPSTREAM, "timeouts": {"reed": 5}}}]},
         "models.0.base.timeouts.reed"),
        ({"server": {"port": 0}, "models": [{"name": "a", "method": "base_only", "base": UPSTREAM}]},
         "server.port"),
    ],
)
def test_bad_configs_name_the_field(data: object, expected: str) -> None:
    assert expected in config_error(data)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "alpha, beta")
    config = parse_config({"server": {"api_keys_env": "TEST_KEYS"},
                           "models": [{"name": "a", "method": "base_only", "base": UPSTREAM}]})
    with running(create_app(config)) as proxy:
        assert httpx.get(proxy + "/v1/models").status_code == 401
        wrong = httpx.get(proxy + "/v1/models", headers={"Authorization": "Bearer gamma"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert "gamma" not in wrong.text
        for key in ("alpha", "beta"):
            assert (
                httpx.get(proxy + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            )
        assert httpx.get(proxy + "/health").status_code == 200


def test_no_keys_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "")
    config = parse_config({"server": {"api_keys_env": "TEST_KEYS"},
                           "models": [{"name": "a", "method": "base_only", "base": UPSTREAM}]})
    with running(create_app(config)) as proxy:
        assert httpx.get(proxy + "/v1/models").status_code == 200


def test_models_sharing_an_upstream_must_agree_on_its_pool_settings() -> None:
    # One ReplicaSet serves both models: the second one's slots and timeouts would be ignored.
    slow = {**UPSTREAM, "max_in_flight": 8, "timeouts": {"read": 5}}
    message = config_error({"models": [{"name": "a", "method": "base_only", "base": UPSTREAM},
                                       {"name": "b", "method": "base_only", "base": slow}]})
    assert "model 'b' shares its base upstream" in message and "model 'a'" in message
    assert "max_in_flight, timeouts differently" in message
    # The same settings, or another upstream model, are fine.
    parse_config({"models": [{"name": "a", "method": "base_only", "base": slow},
                             {"name": "b", "method": "base_only", "base": slow},
                             {"name": "c", "method": "base_only", "base": {**UPSTREAM, "model": "other"}}]})
