"""The proxy's YAML configuration, validated at start-up; secrets come from the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nudging_core.methods import METHODS, Method
from nudging_core.nudging import NudgingParams, Strategy
from nudging_core.templates import AUTO_TEMPLATE, BUILTIN_TEMPLATES, JINJA_SUFFIXES
from nudging_core.upstream import DIALECT_NAMES, AnswerCaps, Timeouts

# One place for the nudging settings' defaults (the core's own) and bounds (a model's config
# and a request's `nudging` extension share them).
_NUDGING = NudgingParams()
_CAPS = AnswerCaps()
Threshold = Annotated[float, Field(gt=0, le=1)]
LookaheadTokens = Annotated[int, Field(ge=1, le=256)]


def _check_http_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} must start with http:// or https://")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


POOL_SETTINGS = frozenset(
    {"max_in_flight", "timeouts", "cooldown_seconds", "max_answer_bytes", "max_event_bytes"}
)
UPSTREAM_ROLES = ("base", "nudging", "nudging_base")


class UpstreamConfig(Strict):
    url: str | None = Field(
        None, description="base URL of the OpenAI-compatible API, e.g. http://vllm-base:8000/v1"
    )
    urls: list[str] | None = Field(
        None, min_length=1, description="several replicas of the same model instead of one `url`"
    )
    cooldown_seconds: float = Field(
        10.0, gt=0, description="a failed replica takes no new generations for this long"
    )
    model: str
    api_key_env: str | None = None
    dialect: str = Field("auto", description="wire format: auto (from /v1/models) or a server name")
    chat_template: str | None = Field(
        None, description="nudger only: a built-in name, auto (the upstream renders it) or a jinja file"
    )
    bos_token: str = ""
    eos_token: str = ""
    max_in_flight: int = Field(64, ge=1)
    timeouts: Timeouts = Timeouts()
    # At least 64 KiB: a few events' worth, so a typo cannot make every answer fail.
    max_answer_bytes: int = Field(
        _CAPS.body, ge=64 * 1024, description="the largest JSON answer read; a larger one is a 502"
    )
    max_event_bytes: int = Field(
        _CAPS.event, ge=64 * 1024, description="the largest stream event (line) read; a larger one fails it"
    )

    def answer_caps(self) -> AnswerCaps:
        return AnswerCaps(body=self.max_answer_bytes, event=self.max_event_bytes)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            _check_http_url(url)
        return url

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str] | None) -> list[str] | None:
        for url in urls or []:
            _check_http_url(url)
        if urls is not None and len(set(urls)) != len(urls):
            raise ValueError("lists the same URL twice")
        return urls

    @model_validator(mode="after")
    def _one_address(self) -> UpstreamConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give either `url` (one server) or `urls` (replicas), not both or neither")
        return self

    @property
    def endpoints(self) -> list[str]:
        return self.urls if self.urls is not None else [self.url or ""]

    @field_validator("dialect")
    @classmethod
    def _known_dialect(cls, name: str) -> str:
        if name not in DIALECT_NAMES:
            raise ValueError(f"unknown dialect {name!r}; use one of {', '.join(DIALECT_NAMES)}")
        return name

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, name: str | None) -> str | None:
        if name is None or name in BUILTIN_TEMPLATES or name == AUTO_TEMPLATE:
            return name
        if name.endswith(JINJA_SUFFIXES):
            if not Path(name).is_file():
                raise ValueError(f"template file {name} does not exist")
            return name
        raise ValueError(
            f"unknown template {name!r}; use one of {', '.join(BUILTIN_TEMPLATES)}, "
            f"{AUTO_TEMPLATE!r} (rendered by the upstream) or a .jinja file"
        )

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def sharing_key(self, role: str) -> tuple[tuple[str, ...], str, str | None, str, str]:
        """Upstreams with the same key are one set of connections and slots, whichever models
        name them (the registry builds it once)."""
        return (tuple(self.endpoints), self.model, self.api_key_env, self.dialect, role)

    def pool_settings(self) -> dict[str, object]:
        """The settings of the shared connections and slots, which sharers must agree on."""
        return self.model_dump(include=set(POOL_SETTINGS))


class ModelConfig(Strict):
    name: str = Field(min_length=1)
    method: Method = "nudging"
    base: UpstreamConfig | None = None
    nudging: UpstreamConfig | None = None
    nudging_base: UpstreamConfig | None = Field(
        None, description="proxy_tuning only: the nudging model's own base model (same tokenizer)"
    )
    threshold: Threshold = _NUDGING.threshold
    lookahead_tokens: LookaheadTokens = _NUDGING.lookahead_tokens
    chunk_tokens: int = Field(_NUDGING.chunk_tokens, ge=1, le=256)
    probe_window: int = Field(
        _NUDGING.probe_window, ge=1, le=256,
        description="fast: how many base probes of one round are open at once",
    )
    max_rounds: int = Field(_NUDGING.max_rounds, ge=1)
    strategy: Strategy = _NUDGING.strategy
    cleanup: bool = _NUDGING.cleanup
    answer_start: str = ""
    default_system_prompt: str | None = None
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    wrap_completion_prompt: bool = Field(
        False, description="/v1/completions: render the prompt as a user turn in the nudger's template"
    )
    retries: int = Field(
        1, ge=0, le=5,
        description="times a choice starts again after an upstream failure (unreachable, timeout, 5xx), "
        "only while none of its text has reached the client",
    )
    on_nudger_failure: Literal["error", "base_only"] = Field(
        "error", description="base_only: answer with the base model alone when the nudging upstream fails"
    )
    passthrough: Literal["completions", "chat"] | None = Field(
        None, description="base_only and nudging_only: chat requests go to the upstream's "
        "/v1/chat/completions as they came (chat) or are rendered by the proxy (completions); "
        "unset: chat where the upstream renders its template (chat_template: auto)",
    )
    on_tools: Literal["error", "nudging_only"] = Field(
        "error", description="nudging: a chat request with tools, tool_choice or response_format is "
        "refused (error) or answered by the nudging model alone through its chat endpoint (nudging_only)",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="requests of this model running at once (None: no limit); "
        "more wait in a queue, answered 429 with Retry-After when it is full or their wait ends"
    )
    max_queued: int = Field(64, ge=0, description="requests waiting for a place when max_concurrent run")
    queue_timeout_seconds: float = Field(
        10, gt=0, description="the longest a request waits in the queue before its 429"
    )

    @model_validator(mode="after")
    def _roles_present(self) -> ModelConfig:
        method = METHODS[self.method]
        for role in method.roles:
            if getattr(self, role) is None:
                raise ValueError(f"method {self.method!r} needs the {role!r} upstream")
        nudger = self.nudging
        if method.combined and nudger is not None and nudger.chat_template is None:
            raise ValueError("the nudging upstream needs a chat_template")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens exceeds max_tokens_limit")
        if self.passthrough is not None and method.combined:
            raise ValueError(f"passthrough: only base_only and nudging_only models pass through, "
                             f"not method {self.method!r}")
        if self.on_tools != "error" and self.method != "nudging":
            raise ValueError(f"on_tools: only nudging models fall back to the nudging model alone, "
                             f"not method {self.method!r}")
        return self

    @property
    def passes_chat_through(self) -> bool:
        """Whether chat requests go to the passthrough upstream's own chat endpoint."""
        if METHODS[self.method].combined:
            return False
        if self.passthrough is not None:
            return self.passthrough == "chat"
        upstream = self.base if METHODS[self.method].prompt_role == "base" else self.nudging
        return upstream is not None and upstream.chat_template == AUTO_TEMPLATE


class LimitsConfig(Strict):
    """Bounds on one request; a request over one gets a 400 naming the field (413 for the body)."""

    max_body_bytes: int = Field(1 << 20, ge=1)
    max_messages: int = Field(512, ge=1)
    max_message_chars: int = Field(200_000, ge=1, description="text of one chat message")
    max_prompt_chars: int = Field(
        500_000, ge=1,
        description="a completions prompt (a batch's together, a token id counting one), a nudging_prompt, "
                    "or all chat messages together",
    )
    max_n: int = Field(16, ge=1)
    max_prompts: int = Field(64, ge=1, description="prompts in one batched completions request")
    max_choices: int = Field(
        64, ge=1, description="generations of one request: its prompts times n (each runs concurrently)"
    )
    max_stop: int = Field(4, ge=1, description="stop strings per request (OpenAI allows 4)")
    max_stop_chars: int = Field(256, ge=1, description="length of one stop string")


class CorsConfig(Strict):
    allow_origins: list[str] = Field(default_factory=list, description="empty: no CORS headers")


class ServerConfig(Strict):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    api_keys_env: str | None = Field(
        None, description="env var holding comma-separated API keys; unset or empty disables auth"
    )
    api_keys_file: str | None = Field(None, description="file with one API key per line ('#' comments)")
    protect_health: bool = Field(False, description="require an API key for /health and /ready")
    protect_metrics: bool = Field(False, description="require an API key for /metrics")
    cors: CorsConfig = CorsConfig()
    limits: LimitsConfig = LimitsConfig()
    shutdown_grace_seconds: int = Field(
        30, ge=0, description="on SIGTERM, how long in-flight requests may run before they are ended"
    )
    header_timeout_seconds: float = Field(
        10, gt=0, description="a connection that has not sent a whole request head this long after it "
        "opened (or after its last response) is closed: slow clients cannot hold connections"
    )
    body_timeout_seconds: float = Field(
        30, gt=0, description="a request whose body has not all arrived this long after its head has its "
        "connection closed: slow clients cannot hold connections with a partial body"
    )
    send_timeout_seconds: float = Field(
        30, gt=0, description="a streamed answer whose client has not taken its next event this long is "
        "ended and its upstream requests cancelled: clients that stop reading cannot hold upstream slots"
    )
    stream_open_seconds: float = Field(
        1, ge=0, description="a stream's headers and a first SSE comment go out once its first event has "
        "taken this long (a failure before then is an HTTP error, after it an error event): clients see "
        "progress during a long first token"
    )
    keep_alive_seconds: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int | None = Field(
        1000, ge=1, description="open connections (or running requests) past which a request gets a 503"
    )
    workers: int = Field(
        1, ge=1, le=256, description="processes serving requests (`serve --workers` overrides); "
        "metrics add up over them"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # uvicorn's --loop and --http: "auto" takes uvloop and httptools (installed with the proxy)
    # and falls back to asyncio and h11 where they cannot be imported.
    loop: Literal["auto", "asyncio", "uvloop"] = Field("auto", description="event loop (uvicorn's --loop)")
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="HTTP/1.1 parser (uvicorn's --http)"
    )
    playground: bool = Field(
        False, description="serve the browser playground at /playground (behind the API keys when set)"
    )

    @field_validator("api_keys_file")
    @classmethod
    def _readable_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"API key file {path} does not exist")
        return path

    def api_keys(self) -> list[str]:
        raw = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        keys = [key.strip() for key in raw.split(",")]
        if self.api_keys_file is not None:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return [key for key in keys if key]


class Config(Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [model.name for model in models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {', '.join(duplicates)}")
        return models

    @model_validator(mode="after")
    def _shared_upstreams_agree(self) -> Config:
        """Two models naming the same upstream share its slots and timeouts: different
        settings for it could not both hold, so they are a start-up error, not a silent pick."""
        first: dict[tuple[tuple[str, ...], str, str | None, str, str], tuple[str, UpstreamConfig]] = {}
        for model in self.models:
            for role in UPSTREAM_ROLES:
                upstream: UpstreamConfig | None = getattr(model, role)
                if upstream is None:
                    continue
                named, earlier = first.setdefault(upstream.sharing_key(role), (model.name, upstream))
                theirs, ours = earlier.pool_settings(), upstream.pool_settings()
                differing = sorted(key for key in ours if ours[key] != theirs[key])
                if differing:
                    raise ValueError(
                        f"model {model.name!r} shares its {role} upstream (same url and model) with "
                        f"model {named!r} but sets {', '.join(differing)} differently; a shared upstream "
                        f"has one pool of connections and slots, so give both the same settings")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((model for model in self.models if model.name == name), None)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {location}: {item['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: object) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    return parse_config(data)
