"""The FastAPI application factory: routers, error mapping, metrics middleware and the service lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fieldkube.serving import routes_v1, routes_v2, ui
from fieldkube.serving.errors import install_error_handlers
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.service import Service
from fieldkube.serving.settings import ServeSettings


class RequestMetricsMiddleware:
    """Latency by endpoint (route template, so bounded label values) and status; in-flight gauge."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(endpoint, scope["method"], str(status)).observe(
                time.perf_counter() - start
            )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the models only referenced from hand-written request bodies."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    extra = routes_v2.InferenceRequestBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(extra.pop("$defs", {}))
    components["InferenceRequestBody"] = extra
    app.openapi_schema = schema
    return schema


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """A ready-to-run app; models load in the background after start-up (ready once warmed up)."""
    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="fieldkube-serve",
        version=routes_v2._server_version(),
        description="Flower counting and building segmentation on field imagery: /v1 domain API, "
        "/v2 Open Inference Protocol, / web page, /metrics Prometheus.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(routes_v1.router)
    app.include_router(routes_v2.router)
    app.include_router(ui.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
