"""OpenAI's error shape for the OpenAI routes: `{"error": {"message", "type", "param", "code"}}`, with the
statuses the openai client maps to its error classes (400, 401, 404, 429; 500 for a server fault, which
is logged and names no internals). `param` is the field a message starts with (`max_tokens: ...`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from mintd.api.auth import Unauthorized
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.service.errors import NotFound, TooMany
from mintd.service.futures import RequestError

log = logging.getLogger(__name__)
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_MEANINGS = {
    400: "a parameter is missing, wrong or not supported; `error.param` names it",
    401: "missing, unknown or expired API key (send `Authorization: Bearer <key>`)",
    404: "no such model for this caller (another owner's adapters look missing)",
    409: "a δ-mem instance is being written by another request, or its state belongs to other weights",
    429: "the base model's queue is full; retry after the Retry-After header's seconds",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": meaning} for code, meaning in _MEANINGS.items()
}


def openai_error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(message: str) -> str | None:
    found = _FIELD.match(message)
    return found[1] if found else None


def _validation(errors: list[Any]) -> JSONResponse:
    parts, params = [], []
    for e in errors[:5]:
        where = ".".join(str(p) for p in _field_path(e.get("loc", ())))
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            message = "unsupported parameter (mintd does not implement it)"
        param = where or _param(message)
        params.append(param)
        parts.append(message if not where or message.startswith(f"{where}:") else f"{where}: {message}")
    return openai_error(
        400, "; ".join(parts) or "invalid request", "invalid_request_error", params[0] if params else None
    )


def _field_path(loc: tuple[Any, ...]) -> list[Any]:
    """A validation error's location up to the first union member's tag (`prompt.list[int]` -> prompt)."""
    path = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if not (isinstance(part, int) or str(part).isidentifier()):
            break
        path.append(part)
    return path


def error_response(exc: Exception) -> JSONResponse:
    """An exception as OpenAI's error body and the status the openai client maps to its error classes."""
    if isinstance(exc, RequestValidationError | ValidationError):
        return _validation(list(exc.errors()))
    if isinstance(exc, HTTPException) and exc.status_code < 500:  # e.g. a body that is not JSON
        return openai_error(exc.status_code, f"request body: {exc.detail}", "invalid_request_error")
    if isinstance(exc, Unauthorized):
        return openai_error(
            401,
            str(exc),
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if isinstance(exc, NotFound | CatalogNotFound):
        return openai_error(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, CatalogConflict):
        return openai_error(409, str(exc), "invalid_request_error", _param(str(exc)), "conflict")
    if isinstance(exc, TooMany):
        return openai_error(
            429,
            str(exc),
            "rate_limit_error",
            "model",
            "rate_limit_exceeded",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    if isinstance(exc, ValueError) or (isinstance(exc, RequestError) and exc.category == "user"):
        return openai_error(400, str(exc), "invalid_request_error", _param(str(exc)))
    log.error("OpenAI route failed", exc_info=exc)
    message = f"internal error ({type(exc).__name__}); quote the x-request-id header to the operator"
    return openai_error(500, message, "server_error")
