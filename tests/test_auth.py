"""API keys from an env var and a file; which paths they guard; CORS, off unless configured."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from nudging_core.config import ConfigError, parse_config
from server.app import create_app

from .servers import running

# Nothing listens on port 9: these tests never reach an upstream.
MODELS = [{"name": "a", "method": "base_only", "base": {"url": "http://127.0.0.1:9/v1", "model": "m"}}]


@contextmanager
def proxy(**server: Any) -> Iterator[str]:
    with running(create_app(parse_config({"server": server, "models": MODELS}))) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text("# one key per line\nfile-key-1\n\n  file-key-2  \n")
    return str(path)


def test_keys_from_env_and_file(monkeypatch: pytest.MonkeyPatch, key_file: str) -> None:
    monkeypatch.setenv("TEST_KEYS", "env-key")
    with proxy(api_keys_env="TEST_KEYS", api_keys_file=key_file) as url:
        for key in ("env-key", "file-key-1", "file-key-2"):
            assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
        lowercase = httpx.get(url + "/v1/models", headers={"authorization": "bearer file-key-1"})
        assert lowercase.status_code == 200
        wrong = [{}, bearer("# one key per line"), bearer("file-key"), {"Authorization": "file-key-1"}]
        for headers in wrong:
            refused = httpx.get(url + "/v1/models", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"] == {
                "message": "Invalid or missing API key.", "type": "authentication_error", "param": None,
                "code": "invalid_api_key",
            }
        refused = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "hi"})
        assert refused.status_code == 401


def test_file_keys_alone(key_file: str) -> None:
    with proxy(api_keys_file=key_file) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=bearer("file-key-2")).status_code == 200


def test_keys_guard_the_tokenizer_endpoints_and_one_model(key_file: str) -> None:
    with proxy(api_keys_file=key_file) as url:
        assert httpx.get(url + "/v1/models/a").status_code == 401
        assert httpx.get(url + "/v1/models/a", headers=bearer("file-key-1")).status_code == 200
        assert httpx.get(url + "/tokenizer_info").status_code == 401
        assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.post(url + "/detokenize", json={"tokens": [1]}).status_code == 401
        # Past the key check, the upstream is down.
        tokenized = httpx.post(url + "/tokenize", json={"prompt": "x"}, headers=bearer("file-key-1"))
        assert tokenized.status_code == 502


def test_missing_key_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.api_keys_file"):
        parse_config({"server": {"api_keys_file": str(tmp_path / "none")}, "models": MODELS})


def test_health_ready_and_metrics_are_open_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "k")
    with proxy(api_keys_env="TEST_KEYS") as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/ready").status_code == 503  # past the key check; upstream is down
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/openapi.json").status_code == 401


def test_health_and_metrics_can_be_protected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "k")
    with proxy(api_keys_env="TEST_KEYS", protect_health=True, protect_metrics=True) as url:
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/health", headers=bearer("k")).status_code == 200
        assert httpx.get(url + "/metrics", headers=bearer("k")).status_code == 200


def test_cors_is_off_by_default() -> None:
    with proxy() as url:
        response = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_the_configured_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "k")
    with proxy(api_keys_env="TEST_KEYS", cors={"allow_origins": ["https://app.example"]}) as url:
        preflight_headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                             "Access-Control-Request-Headers": "authorization, content-type"}
        # Browsers send preflights without credentials: they are answered before the key check.
        preflight = httpx.options(url + "/v1/chat/completions", headers=preflight_headers)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        response = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example", **bearer("k")})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        other = httpx.get(url + "/v1/models", headers={"Origin": "https://evil.example", **bearer("k")})
        assert "access-control-allow-origin" not in other.headers
