"""The FastAPI application: routers plus one error policy for all of them.

ValueError and pydantic errors are the client's (400/422, naming the field); unknown or foreign
objects are 404; bad credentials 401. Anything else is logged with its traceback and answered 500
with a one-line message: no stack trace ever reaches a client, and no error body is ever empty.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from mintd import __version__
from mintd.api import catalog as catalog_routes
from mintd.api import exports, mint, tinker
from mintd.api.auth import Authenticator, Unauthorized
from mintd.catalog.errors import CatalogNotFound
from mintd.service.tinker import NotFound, TinkerService

if TYPE_CHECKING:
    from mintd.catalog import Catalog
    from mintd.store.blobs import Blobs

log = logging.getLogger(__name__)


def _field_errors(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(parts)


def create_app(
    service: TinkerService,
    auth: Authenticator,
    long_poll_s: float = 25.0,
    catalog: Catalog | None = None,
    blobs: Blobs | None = None,
    download_ttl_s: int = 900,
) -> FastAPI:
    """The app; the catalog routes (/api/v1/catalog) are mounted only when a `catalog` is given."""
    app = FastAPI(title="mintd", version=__version__)
    app.state.service = service
    app.state.auth = auth
    app.state.long_poll_s = long_poll_s
    app.state.catalog = catalog
    app.state.blobs = blobs
    app.state.download_ttl_s = download_ttl_s
    app.include_router(tinker.router)
    app.include_router(mint.router)
    app.include_router(exports.router)
    if catalog is not None:
        app.include_router(catalog_routes.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _field_errors(exc.errors())}, status_code=422)

    @app.exception_handler(ValidationError)
    async def _invalid_model(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"detail": _field_errors(exc.errors())}, status_code=400)

    @app.exception_handler(ValueError)
    async def _bad(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or "bad request"}, status_code=400)

    @app.exception_handler(NotFound)
    async def _missing(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(CatalogNotFound)
    async def _not_in_catalog(_: Request, exc: CatalogNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or "not found"}, status_code=404)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app
