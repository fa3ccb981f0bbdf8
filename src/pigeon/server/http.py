"""The HTTP side of ``pigeon serve``: a Starlette app run by uvicorn on the server's event loop.

``/healthz``, ``/metrics`` (Prometheus), the admin API under ``/api/``, the schema registry under
``/registry`` and the dashboard at ``/``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from ..engine import Engine
from ..registry import SchemaRegistry
from .admin import AdminConfig, admin_routes
from .admin.errors import problem
from .dashboard import dashboard_routes
from .metrics import CONTENT_TYPE_LATEST, Observer
from .nats import NatsServer
from .pigeon_api import PigeonApi
from .registry import registry_app

__all__ = ["DEFAULT_HTTP_PORT", "create_app"]

DEFAULT_HTTP_PORT = 8333


def create_app(
    engine: Engine,
    nats: NatsServer,
    api: PigeonApi,
    observer: Observer,
    admin: AdminConfig | None = None,
    registry: SchemaRegistry | None = None,
) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "nats_port": nats.port, "streams": len(engine.streams())})

    async def metrics(request: Request) -> Response:
        return Response(observer.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [Route("/healthz", healthz), Route("/metrics", metrics)]
    routes += admin_routes(engine, nats, api, observer, admin or AdminConfig())
    if registry is not None:
        routes.append(Mount("/registry", app=registry_app(registry, admin.token if admin else None)))
    return Starlette(
        routes=routes + dashboard_routes(),
        exception_handlers={404: _unrouted, 405: _unrouted},
    )


async def _unrouted(request: Request, error: Exception) -> Response:
    """A path or method no route takes: the API's own error shape under /api/ and /registry,
    so clients of either never meet a text page."""
    status = error.status_code if isinstance(error, HTTPException) else 404
    what = "no such path" if status == 404 else f"{request.method} is not allowed here"
    path = request.url.path
    if path.startswith("/api/"):
        return problem(status, "not_found" if status == 404 else "method_not_allowed", f"{what}: {path}")
    if path.startswith("/registry"):
        return JSONResponse({"error_code": status, "message": f"{what}: {path}"}, status_code=status)
    return PlainTextResponse(what, status_code=status)
