"""The FastAPI application: routers, the request guard (ids, body caps) and one error policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from mintd import __version__
from mintd.api import catalog as catalog_routes
from mintd.api import errors, exports, mint, tinker
from mintd.api.auth import Authenticator
from mintd.api.guard import RequestGuard
from mintd.config import ServeSettings
from mintd.service.tinker import TinkerService

if TYPE_CHECKING:
    from mintd.catalog import Catalog
    from mintd.store.blobs import Blobs


def create_app(
    service: TinkerService,
    auth: Authenticator,
    settings: ServeSettings | None = None,
    catalog: Catalog | None = None,
    blobs: Blobs | None = None,
) -> FastAPI:
    """The app; the catalog routes (/api/v1/catalog) are mounted only when a `catalog` is given."""
    settings = settings or ServeSettings()
    app = FastAPI(
        title="mintd",
        version=__version__,
        description="Tinker-compatible training and sampling, signed checkpoint downloads and the "
        'adapter catalog. Every error body is `{"detail": "..."}`.',
    )
    app.state.service = service
    app.state.auth = auth
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.blobs = blobs
    app.include_router(tinker.router)
    app.include_router(mint.router)
    app.include_router(exports.router)
    if catalog is not None:
        app.include_router(catalog_routes.router)
    errors.install(app)
    app.add_middleware(RequestGuard, settings=settings)
    return app
