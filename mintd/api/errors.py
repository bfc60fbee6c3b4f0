"""One error policy for every route, and the error shape the OpenAPI schema publishes.

Every error body is `{"detail": "<one line>"}`. ValueError and pydantic errors are the client's
(400/422, naming the field); unknown or foreign objects are 404 (worded alike, so existence does not
leak); a training run held by another replica 409 (naming it); closed sessions' objects 410; bad
credentials 401; quotas 429. Anything else is logged with its
traceback under the request's id and answered 500 with that id (by `guard.RequestGuard`): no stack
trace or server path ever reaches a client.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mintd.api.auth import Unauthorized
from mintd.catalog.errors import CatalogNotFound
from mintd.service.errors import Gone, NotFound, TooMany
from mintd.service.runs import RunElsewhere


class ErrorBody(BaseModel):
    detail: str


_MEANINGS = {
    400: "bad input; `detail` names the field",
    401: "missing, unknown or expired credential",
    404: "no such object for this caller (another owner's objects look missing)",
    409: "the training run lives on another replica; headers name it (x-mintd-replica, -url)",
    410: "gone: an expired result, or an object of a closed session",
    413: "request body too large",
    422: "a field of the request is missing or has the wrong type",
    429: "the caller holds as many sessions, runs or samplers as allowed",
    500: "server fault; `detail` carries the request id to quote",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": meaning} for code, meaning in _MEANINGS.items()
}


def _field_errors(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail or "error"}, status_code=status, headers=headers or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _field_errors(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _invalid_model(_: Request, exc: ValidationError) -> JSONResponse:
        return _error(400, _field_errors(exc.errors()))

    @app.exception_handler(ValueError)
    async def _bad(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc) or "bad request")

    @app.exception_handler(NotFound)
    @app.exception_handler(CatalogNotFound)
    async def _missing(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc) or "not found")

    @app.exception_handler(RunElsewhere)
    async def _elsewhere(_: Request, exc: RunElsewhere) -> JSONResponse:
        # 409 names the holder for a router; x-should-retry stops the SDKs' retry loop on 409.
        headers = {"x-mintd-replica": exc.replica, "x-mintd-replica-url": exc.url, "x-should-retry": "false"}
        return _error(409, str(exc), **headers)

    @app.exception_handler(Gone)
    async def _gone(_: Request, exc: Gone) -> JSONResponse:
        return _error(410, str(exc))

    @app.exception_handler(TooMany)
    async def _too_many(_: Request, exc: TooMany) -> JSONResponse:
        return _error(429, str(exc), **{"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return _error(401, str(exc), **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
