"""`GET /metrics` (Prometheus text format) and the middleware that counts every HTTP answer.

The route is open like `/api/v1/healthz`, as scrapers expect: it shows aggregates per base model and per
route template, never an adapter, owner or id.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mintd.service.metrics import Metrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}
    },
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware: counts each answer by route template (not the raw path: ids would explode the
    label set), method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(path, scope["method"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
