"""The schema registry as a server: alone (``pigeon registry``) or beside ``pigeon serve``.

Confluent's clients take a base URL, so the registry is served at the root of its own port
(``--registry-port``); ``pigeon serve`` also mounts it under ``/registry`` on its HTTP port.
With a token, every request needs it: ``Authorization: Bearer <token>``, or Basic auth with
the token as password (what Confluent clients send with ``basic.auth.user.info``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Engine
from ..registry import SchemaRegistry
from ..registry.http import CONTENT_TYPE, create_registry_app
from .listener import HttpServer, check_exposure, until_stopped

__all__ = ["DEFAULT_REGISTRY_PORT", "RegistryOptions", "registry_app", "run", "running"]

DEFAULT_REGISTRY_PORT = 8334

log = logging.getLogger("pigeon.registry")


@dataclass(frozen=True)
class RegistryOptions:
    data: Path = Path("pigeon-data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_REGISTRY_PORT
    token: str | None = None  # required by every request when set; without it, loopback only


def registry_app(registry: SchemaRegistry, token: str | None) -> Starlette:
    """The REST API, behind the token when there is one."""
    app = create_registry_app(registry)
    if token is None:
        return app
    return Starlette(routes=app.routes, middleware=[Middleware(_TokenGuard, token=token)])


class _TokenGuard(BaseHTTPMiddleware):
    def __init__(self, app: object, token: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self._token = token.encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = _given_token(request.headers.get("authorization", ""))
        if given is None or not hmac.compare_digest(given, self._token):
            return JSONResponse(
                {
                    "error_code": 40101,
                    "message": "Unauthorized: give the token as Bearer, or as the Basic password",
                },
                status_code=401,
                media_type=CONTENT_TYPE,
                headers={"WWW-Authenticate": 'Basic realm="pigeon registry"'},
            )
        return await call_next(request)


def _given_token(authorization: str) -> bytes | None:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]
    return None


@contextlib.asynccontextmanager
async def running(options: RegistryOptions) -> AsyncIterator[HttpServer]:
    """The registry served on ``host:port`` (0 picks a free port), stopped and closed on exit."""
    check_exposure("the schema registry", options.host, options.token)
    async with contextlib.AsyncExitStack() as stack:
        engine = await Engine.open(options.data)
        stack.push_async_callback(engine.close)
        registry = await SchemaRegistry.open(engine)
        http = HttpServer(registry_app(registry, options.token), options.host, options.port)
        await http.start()
        stack.push_async_callback(http.stop)
        yield http


async def run(options: RegistryOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    async with running(options) as http:
        log.info("pigeon registry listening on %s, data %s", http.url, options.data)
        await until_stopped()
        log.info("pigeon registry stopping")
