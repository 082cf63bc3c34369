"""The playground: a page at `/playground` that runs a nudged model beside its base model alone
and its aligned model alone, three answers streaming at once, the aligned model's words marked.

The page is a client of the public API (`/v1/chat/completions`, streamed, with the `nudging`
extension's provenance and, for the base model alone, its logprobs). The one thing the API
cannot tell it is which configured models share a nudged model's upstreams; `/playground/session`
says so (model names, their method's defaults and the upstream model names; never an address
or an upstream key). Its assets are files of this package: no build step, no CDN, no font
download, for air-gapped clusters.

With API keys configured, the page, its assets and its session need a key too, and the API
key middleware cannot ask a browser for one: these paths check it here, as `Authorization:
Bearer <key>` or HTTP Basic with the key as password (the browser's own login prompt), and
the session hands the key to the page for its API calls.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from nudging_core.config import Config, ModelConfig, ServerConfig, UpstreamConfig

PREFIX = "/playground"
STATIC = Path(__file__).parent / "static"
ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page may talk to its own origin only (and draws nothing it does not ship).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REALM = 'Basic realm="nudging-proxy playground", charset="UTF-8"'


def paths(server: ServerConfig) -> frozenset[str]:
    """The playground's paths, which check API keys themselves (empty when it is off)."""
    if not server.playground:
        return frozenset()
    return frozenset({PREFIX, PREFIX + "/", PREFIX + "/session"} | {f"{PREFIX}/{name}" for name in ASSETS})


def _same_upstream(a: UpstreamConfig | None, b: UpstreamConfig | None) -> bool:
    return a is not None and b is not None and a.model == b.model and set(a.endpoints) == set(b.endpoints)


def _sibling(config: Config, nudged: ModelConfig, method: str) -> str | None:
    """A configured model of `method` on the nudged model's upstream for that role, preferring
    one that builds the same prompt."""
    role = "base" if method == "base_only" else "nudging"
    mine: UpstreamConfig | None = getattr(nudged, role)

    def same_upstream(model: ModelConfig) -> bool:
        theirs: UpstreamConfig | None = getattr(model, role)
        # The aligned model alone must also render the same chat prompt.
        return _same_upstream(theirs, mine) and (
            role == "base" or (theirs is not None and mine is not None
                               and theirs.chat_template == mine.chat_template))

    found = [model for model in config.models if model.method == method and same_upstream(model)]

    def same_prompt(model: ModelConfig) -> bool:
        return (model.answer_start, model.default_system_prompt) == (nudged.answer_start,
                                                                      nudged.default_system_prompt)

    found.sort(key=lambda model: not same_prompt(model))
    return found[0].name if found else None


def describe_models(config: Config) -> list[dict[str, Any]]:
    """The nudged models and the models the page compares each one with."""
    return [
        {
            "name": model.name,
            "threshold": model.threshold,
            "lookahead_tokens": model.lookahead_tokens,
            "strategy": model.strategy,
            "default_max_tokens": model.default_max_tokens,
            "max_tokens_limit": model.max_tokens_limit,
            "base_model": model.base.model if model.base else None,
            "nudging_model": model.nudging.model if model.nudging else None,
            "base_only": _sibling(config, model, "base_only"),
            "nudging_only": _sibling(config, model, "nudging_only"),
        }
        for model in config.models
        if model.method == "nudging"
    ]


def _offered_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user  # the key as password; a key typed as the user name also works
    return None


def _matching_key(header: str | None, keys: list[bytes]) -> str | None:
    offered = _offered_key(header)
    if offered is None:
        return None
    candidate = offered.encode()
    # Compare with every key so the time taken does not reveal which one nearly matched.
    matches = [hmac.compare_digest(candidate, key) for key in keys]
    return offered if any(matches) else None


def create_router(config: Config) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    keys = [key.encode() for key in config.server.api_keys()]
    models = describe_models(config)

    def challenge() -> Response:
        body = {"error": {"message": "The playground needs an API key (as the password).",
                          "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": REALM, **SECURITY_HEADERS})

    def key_of(request: Request) -> tuple[bool, str | None]:
        if not keys:
            return True, None
        key = _matching_key(request.headers.get("authorization"), keys)
        return key is not None, key

    @router.get(PREFIX)
    @router.get(PREFIX + "/")
    async def page(request: Request) -> Response:
        allowed, _ = key_of(request)
        if not allowed:
            return challenge()
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers=SECURITY_HEADERS)

    @router.get(PREFIX + "/session")
    async def session(request: Request) -> Response:
        allowed, key = key_of(request)
        if not allowed:
            return challenge()
        return JSONResponse({"models": models, "api_key": key}, headers=SECURITY_HEADERS)

    def asset(name: str, media_type: str) -> None:
        @router.get(f"{PREFIX}/{name}", name=f"playground-{name}")
        async def serve(request: Request) -> Response:
            if not key_of(request)[0]:
                return challenge()
            return FileResponse(STATIC / name, media_type=media_type, headers=SECURITY_HEADERS)

    for name, media_type in ASSETS.items():
        asset(name, media_type)
    return router


def install(app: FastAPI, config: Config) -> None:
    """Serve the playground if the config turns it on."""
    if config.server.playground:
        app.include_router(create_router(config))
