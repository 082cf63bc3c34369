"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a client can see is an `APIError` made here, so two rules live in one place:
invalid input is a 400 (never a 500), and server-side messages never carry upstream
addresses. No web framework: the server turns an `APIError` into its HTTP response
(server/errors.py), the service raises it, the eval reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from nudging_core.upstream import ContextOverflow, UpstreamBusy, UpstreamError, UpstreamTimeout

INVALID_REQUEST: Final = "invalid_request_error"
AUTHENTICATION: Final = "authentication_error"
PERMISSION: Final = "permission_error"
RATE_LIMIT: Final = "rate_limit_error"
SERVER_ERROR: Final = "server_error"
UPSTREAM_ERROR: Final = "upstream_error"

_UPSTREAM_CODES: Final[Mapping[int, str]] = {
    502: "upstream_error",
    503: "upstream_unavailable",
    504: "upstream_timeout",
}

# A busy upstream frees a slot whenever any of its requests ends: no better guess than soon.
BUSY_RETRY_AFTER_SECONDS: Final = 1

# Anything that looks like a URL; upstream errors (httpx messages, say) often quote one.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")



def scrub_urls(text: str) -> str:
    return _URL.sub("<upstream>", text)


def _type_for_status(status_code: int) -> str:
    if status_code == 401:
        return AUTHENTICATION
    if status_code == 403:
        return PERMISSION
    if status_code == 429:
        return RATE_LIMIT
    if status_code >= 500:
        return SERVER_ERROR
    return INVALID_REQUEST


def error_body(error: APIError) -> dict[str, dict[str, Any]]:
    """The JSON body of an error response (also the payload of an SSE error event)."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


class APIError(Exception):
    """An error to return to the client as is. `type` defaults from the status code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        # Server-side messages may quote an upstream's error text; strip addresses here so
        # no caller can forget to.
        if status_code >= 500:
            message = scrub_urls(message)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _type_for_status(status_code)
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, for a Retry-After header

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return error_body(self)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, type=INVALID_REQUEST, param=param, code=code)


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 200 else model[:200] + "..."
    return APIError(
        404,
        f"The model '{shown}' does not exist.",
        type=INVALID_REQUEST,
        param="model",
        code="model_not_found",
    )


def overloaded(model: str, why: str, retry_after: int) -> APIError:
    """A model at its `max_concurrent` with a full queue, or a request that waited its
    `queue_timeout_seconds`: OpenAI's rate-limit answer (type `requests`, code
    `rate_limit_exceeded`), which clients such as the OpenAI SDK retry after `Retry-After`."""
    return APIError(429, f"The model '{model}' is at capacity: {why}. Retry after {retry_after} s.",
                    type="requests", code="rate_limit_exceeded", retry_after=retry_after)


def unauthorized(message: str = "Invalid or missing API key.") -> APIError:
    return APIError(401, message, type=AUTHENTICATION, code="invalid_api_key")


def upstream_unavailable(
    role: str, message: str, *, status_code: int = 502, retry_after: int | None = None
) -> APIError:
    """An upstream model server failed (502), is unavailable (503) or timed out (504)."""
    if status_code not in _UPSTREAM_CODES:
        raise ValueError(f"upstream errors are 502, 503 or 504, not {status_code}")
    return APIError(
        status_code,
        f"The {role} model's server failed: {message}",
        type=UPSTREAM_ERROR,
        code=_UPSTREAM_CODES[status_code],
        retry_after=retry_after,
    )


def no_chat_template(model: str, error: UpstreamError) -> APIError:
    """`chat_template: auto` on an upstream whose model has none: the proxy's configuration
    is at fault, so a server-side error that says what to change."""
    return APIError(
        500,
        f"Model {model!r} is configured with chat_template: auto, but the {error.role} model's server "
        f"has no chat template to render ({scrub_urls(error.message)}). Set the model's "
        f"{error.role}.chat_template in the proxy's configuration to a built-in template or a jinja file.",
        type=SERVER_ERROR,
        param=None,
        code="chat_template_unavailable",
    )


def upstream_failure(error: UpstreamError) -> APIError:
    """An upstream's failure as the client sees it.

    A prompt too long for the model, or a request the upstream rejects as invalid (400/422:
    for passthrough models that is the client's own field), is a 400. Otherwise it is the
    proxy's problem: 504 on a timeout, 503 when the upstream is overloaded (or all its slots
    stayed busy, with Retry-After), else 502.
    """
    message = scrub_urls(error.message)
    if isinstance(error, ContextOverflow):
        return invalid_request(
            f"The prompt is too long for the {error.role} model: {message}",
            code="context_length_exceeded",
        )
    if isinstance(error, UpstreamTimeout):
        return upstream_unavailable(error.role, message, status_code=504)
    if isinstance(error, UpstreamBusy):
        return upstream_unavailable(error.role, message, status_code=503,
                                    retry_after=BUSY_RETRY_AFTER_SECONDS)
    if error.status_code in (400, 422):
        return invalid_request(f"The {error.role} model's server rejected the request: {message}")
    if error.status_code in (429, 503):
        return upstream_unavailable(error.role, message, status_code=503)
    return upstream_unavailable(error.role, message, status_code=502)


def endpoint_not_served(path: str, error: UpstreamError, hint: str = "") -> APIError:
    """The upstream has no `path` (it answered 404 or 405 there): a 501 that says so."""
    return APIError(
        501,
        f"The {error.role} model's server does not serve {path}{hint} ({scrub_urls(error.message)}).",
        type=UPSTREAM_ERROR,
        code="not_implemented",
    )


# --- Validation errors -------------------------------------------------------------------

_LOCATIONS: Final = frozenset({"body", "query", "path", "header", "cookie"})
_TYPE_TAGS: Final = frozenset({"str", "int", "float", "bool", "bytes", "list", "dict", "none"})


def _is_type_tag(segment: str) -> bool:
    # pydantic puts the union member that failed into `loc` ("str", "list[str]",
    # "function-after[...]", "ContentPart"); OpenAI field names are lower snake_case.
    return not segment.isidentifier() or segment in _TYPE_TAGS or segment[:1].isupper()


def _param_path(loc: Sequence[int | str]) -> str | None:
    parts: list[str] = []
    for i, segment in enumerate(loc):
        if i == 0 and segment in _LOCATIONS:
            continue
        if isinstance(segment, str) and _is_type_tag(segment):
            continue
        parts.append(str(segment))
    return ".".join(parts) or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """pydantic/FastAPI validation errors -> one 400, naming the most specific field.

    A union field reports one error per member it tried; the errors are grouped by field, and
    the deepest field wins (a bad content part says `messages.0.content.0.type`, not "content
    should be a string"). The input value is never echoed.
    """
    if not errors:
        return invalid_request("Invalid request body.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return invalid_request("Could not parse the request body as JSON.")
    grouped: dict[str | None, list[Mapping[str, Any]]] = {}
    for error in errors:
        grouped.setdefault(_param_path(error.get("loc", ())), []).append(error)
    param = max(grouped, key=lambda p: 0 if p is None else p.count(".") + 1)
    group = grouped[param]
    kinds = {e.get("type") for e in group}
    if param is None:
        if "missing" in kinds:
            return invalid_request("The request body is missing.")
        if kinds & {"model_attributes_type", "dict_type", "model_type"}:
            return invalid_request("The request body must be a JSON object.")
    elif "missing" in kinds:
        return invalid_request(f"Missing required parameter: '{param}'.", param)
    elif "extra_forbidden" in kinds:
        return invalid_request(f"Unrecognized request argument supplied: '{param}'.", param)
    messages: list[str] = []
    for error in group:
        text = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if text not in messages:
            messages.append(text)
    detail = "; ".join(messages)
    return invalid_request(detail if param is None else f"Invalid value for '{param}': {detail}", param)
