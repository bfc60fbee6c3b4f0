"""The FastAPI application: routers, the request guard (ids, body caps) and one error policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from mintd import __version__
from mintd.api import catalog as catalog_routes
from mintd.api import errors, evaluations, exports, metrics, mint, openai, tinker
from mintd.api.auth import Authenticator
from mintd.api.guard import RequestGuard
from mintd.config import ServeSettings
from mintd.service.serving import Serving
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
    serving: Serving | None = None,
) -> FastAPI:
    """The app; the catalog routes (/api/v1/catalog) and evaluation runs (/api/v1/evaluations) are
    mounted only when a `catalog` is given, the OpenAI routes and /metrics only when `serving` is: at
    /v1 and, for MinT clients, at /oai/api/v1 (left out of the schema: the same routes)."""
    settings = settings or ServeSettings()
    app = FastAPI(
        title="mintd",
        version=__version__,
        description="Tinker-compatible training and sampling, signed checkpoint downloads, the adapter "
        'catalog, and OpenAI-compatible serving. Every error body is `{"detail": "..."}`, except '
        "on the OpenAI routes (/v1), which answer OpenAI's "
        '`{"error": {"message", "type", "param", "code"}}`.',
    )
    app.state.service = service
    app.state.auth = auth
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.blobs = blobs
    app.state.serving = serving
    app.include_router(tinker.router)
    app.include_router(mint.router)
    app.include_router(exports.router)
    if serving is not None:
        app.include_router(openai.router("/v1"))
        app.include_router(openai.router("/oai/api/v1", include_in_schema=False))
        app.include_router(metrics.router)
    if catalog is not None:
        app.include_router(catalog_routes.router)
        app.include_router(evaluations.router)
    errors.install(app)
    app.add_middleware(RequestGuard, settings=settings)
    if serving is not None:
        app.add_middleware(metrics.RequestMetrics, metrics=serving.metrics)  # outermost: counts every answer
    return app
