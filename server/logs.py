"""JSON logs, one object per line, each tagged with the request id of the request it serves.

Logs name upstreams by role, never by address: the formatter also redacts the configured
upstream addresses and API keys from anything a library logs (httpx's own request log, which
quotes URLs, is turned down to warnings).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from nudging_core.config import Config
from nudging_core.upstream.client import request_scope

access_log = logging.getLogger("nudging_proxy.access")
upstream_log = logging.getLogger("nudging_proxy.upstream")

REQUEST_ID_HEADER: Final = "x-request-id"
# Ids clients may choose: short, printable, safe to log and to forward in a header.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=-]{1,128}")
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field
# (except uvicorn's terminal-coloured copy of its message).
_RECORD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"
}
REDACTED: Final = "<redacted>"


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id if it is well formed, else a new one."""
    if header is not None and _VALID_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def secrets_of(config: Config) -> list[str]:
    """What must never appear in a log line: client and upstream API keys, upstream addresses."""
    secrets = config.server.api_keys()
    for model in config.models:
        for upstream in (model.base, model.nudging, model.nudging_base):
            if upstream is None:
                continue
            secrets += [urlsplit(url).netloc for url in upstream.endpoints]
            key = upstream.api_key()
            if key:
                secrets.append(key)
    return secrets


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is redacted whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_scope.get().request_id
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Values only: a short key must not mangle the field names.
        redacted = {k: self._redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        return json.dumps(redacted, default=str, ensure_ascii=False)


def configure_logging(level: str, secrets: Iterable[str] = (), stream: Any = None) -> logging.Handler:
    """Route every logger (ours, uvicorn's) through one JSON handler on stderr (or `stream`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # httpx logs every request with its URL at INFO; those are upstream addresses.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
