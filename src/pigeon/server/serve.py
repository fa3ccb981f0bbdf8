"""``pigeon serve``: the engine behind the NATS protocol (with JetStream) and a small HTTP side.

:func:`run` opens the data folder, starts everything, waits for SIGTERM or SIGINT and stops in
order: no new connections or requests, then the JetStream layer and every client connection,
then the engine, which flushes and releases the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..engine import Engine
from ..engine.config import Durability
from ..errors import InvalidConfigError
from ..registry import SchemaRegistry
from .admin import AdminConfig
from .http import DEFAULT_HTTP_PORT, create_app
from .jetstream import JetStream
from .listener import HttpServer, check_exposure, until_stopped
from .metrics import Observer
from .nats import DEFAULT_PORT, NatsServer, ServerOptions
from .pigeon_api import PigeonApi
from .registry import registry_app

__all__ = ["Running", "ServeOptions", "run", "running"]

log = logging.getLogger("pigeon.serve")


@dataclass(frozen=True)
class ServeOptions:
    data: Path = Path("pigeon-data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT
    sample_interval_s: float = 5.0  # how often group lag is sampled for health and /metrics
    token: str | None = None  # required by the admin API when set; without it, loopback only
    registry_port: int | None = None  # the schema registry at the root of its own port, when given
    demo: bool = False  # run the demo order pipeline through the server (pigeon.demo)
    durability: Durability = "interval"  # of the streams JetStream clients create


@dataclass(frozen=True)
class Running:
    engine: Engine
    nats: NatsServer
    jetstream: JetStream
    api: PigeonApi
    observer: Observer
    http: HttpServer
    registry: HttpServer | None  # on its own port, when asked for


@contextlib.asynccontextmanager
async def running(options: ServeOptions) -> AsyncIterator[Running]:
    """Everything started, yielded, then stopped in order (also when starting fails halfway)."""
    check_exposure("the admin API and the schema registry", options.host, options.token)
    async with contextlib.AsyncExitStack() as stack:
        engine = await Engine.open(options.data)
        stack.push_async_callback(engine.close)
        nats = NatsServer(ServerOptions(host=options.host, port=options.port))
        try:
            await nats.start()
        except OSError as error:
            raise _listen_error("NATS clients", options.host, options.port, error) from None
        stack.push_async_callback(nats.stop)
        jetstream = await JetStream.attach(nats, engine, durability=options.durability)
        stack.push_async_callback(jetstream.close)
        api = await PigeonApi.attach(nats, engine, jetstream)
        stack.push_async_callback(api.close)
        # Stopping is idempotent: this earlier stop drops the clients before JetStream goes,
        # so nothing new is queued for a layer that is shutting down.
        stack.push_async_callback(nats.stop)
        observer = Observer(engine, nats, options.sample_interval_s)
        observer.start()
        stack.push_async_callback(observer.stop)
        registry = await SchemaRegistry.open(engine)
        app = create_app(engine, nats, api, observer, AdminConfig(token=options.token), registry)
        http = HttpServer(app, options.host, options.http_port)
        await http.start()
        stack.push_async_callback(http.stop)
        registry_http = None
        if options.registry_port is not None:
            registry_http = HttpServer(
                registry_app(registry, options.token), options.host, options.registry_port
            )
            await registry_http.start()
            stack.push_async_callback(registry_http.stop)
        if options.demo:
            await _start_demo(stack, nats.url, options.data)
        yield Running(engine, nats, jetstream, api, observer, http, registry_http)


async def run(options: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    async with running(options) as parts:
        log.info(
            "pigeon serve listening: NATS %s, HTTP %s, data %s",
            parts.nats.url,
            parts.http.url,
            options.data,
        )
        if parts.registry is not None:
            log.info("schema registry at %s", parts.registry.url)
        await until_stopped()
        log.info("pigeon serve stopping")


async def _start_demo(stack: contextlib.AsyncExitStack, url: str, data: Path) -> None:
    """The demo is a client like any other: it talks to this server over NATS."""
    from ..demo import OrderPipeline
    from ..transport import connect

    transport = await connect(url)
    stack.push_async_callback(transport.close)
    pipeline = OrderPipeline(transport, data / "demo")
    await pipeline.start()
    stack.push_async_callback(pipeline.stop)
    log.info("demo order pipeline running: streams demo-orders and demo-invoices")


def _listen_error(what: str, host: str, port: int, error: OSError) -> InvalidConfigError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    return InvalidConfigError(f"cannot listen for {what} on {host}:{port}: {reason}")
