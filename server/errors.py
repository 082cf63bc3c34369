"""The HTTP side of errors: an `APIError` (nudging_core/errors.py) as a JSON response, and the
app's handlers for what FastAPI and Starlette raise."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Final, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nudging_core.errors import SERVER_ERROR, APIError, invalid_request, validation_error
from nudging_core.templates import TemplateError

_GENERIC_500: Final = "The server had an error while processing your request."


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    if error.retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(error.retry_after)}
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(cast(APIError, exc))


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    error = validation_error(cast(RequestValidationError, exc).errors())
    if error.param is None and not _is_json(request.headers.get("content-type")):
        # FastAPI only decodes JSON bodies; `curl -d` without a header sends a form type.
        error = invalid_request(
            "The request body must be JSON, sent with 'Content-Type: application/json'."
        )
    return error_response(error)


async def _on_template_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised while rendering the client's messages (bad parts, roles, turn order).
    return error_response(invalid_request(str(exc), "messages"))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    http_exc = cast(StarletteHTTPException, exc)
    status = http_exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    if status in (404, 405) and http_exc.detail == phrase:
        # Routing errors: OpenAI words them like this, naming the client's own path.
        verb = "Invalid URL" if status == 404 else "Method not allowed"
        message = f"{verb} ({request.method} {request.url.path})"
    else:
        message = str(http_exc.detail)
    return error_response(APIError(status, message), headers=http_exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Internals (exception text, upstream URLs) stay out of the response; Starlette re-raises
    # the exception after this handler so the server logs it with its traceback.
    return error_response(APIError(500, _GENERIC_500, type=SERVER_ERROR))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(TemplateError, _on_template_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
