"""``pigeon exporter``: Prometheus lag metrics for groups on any transport.

`pigeon serve` has ``/metrics`` built in; this process does the same for an application's
broker (NATS, Redis, RabbitMQ, PostgreSQL or a data folder): it reads each watched group's lag
through the Transport contract every interval and serves the Kafka-named metrics
(`pigeon.observe.metrics`) with each group's health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry, start_http_server

from ..errors import PigeonError
from ..observe.health import HealthMonitor
from ..observe.metrics import LagCollector
from ..transport import connect

__all__ = ["exporter"]

log = logging.getLogger("pigeon.exporter")


def _watched(groups: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for text in groups:
        stream, _, group = text.partition(":")
        if not stream or not group:
            raise typer.BadParameter(f"{text!r}: write STREAM:GROUP", param_hint="--group")
        pairs.append((stream, group))
    return pairs


def exporter(
    url: Annotated[str, typer.Option(help="The broker, e.g. nats://127.0.0.1:4222 or file://DIR.")],
    group: Annotated[list[str], typer.Option(help="STREAM:GROUP to watch (repeatable).")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port for /metrics.")] = 9333,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between lag readings.")] = 5.0,
) -> None:
    """Serve Prometheus lag metrics for groups on any transport until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watched = _watched(group)
    collector = LagCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        asyncio.run(_run(url, watched, collector, registry, host, port, interval))
    except (PigeonError, OSError) as error:
        typer.echo(f"pigeon exporter: {error}", err=True)
        raise typer.Exit(1) from None


async def _run(
    url: str,
    watched: list[tuple[str, str]],
    collector: LagCollector,
    registry: CollectorRegistry,
    host: str,
    port: int,
    interval: float,
) -> None:
    # A broker that is not there is said in one line, not a warning per connection attempt.
    quiet = logging.getLogger("pigeon.transport")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        transport = await connect(url)
    finally:
        quiet.setLevel(level)
    try:
        for stream, _ in watched:
            await transport.stream_state(stream)  # an unknown stream is a user error, said now
        monitor = HealthMonitor()
        server, thread = start_http_server(port, addr=host, registry=registry)
        log.info(
            "pigeon exporter listening: http://%s:%d/metrics, watching %d group(s)",
            host,
            server.server_port,
            len(watched),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            while not stop.is_set():
                for stream, name in watched:
                    try:
                        lags = await transport.lag(stream, name)
                    except PigeonError as error:
                        collector.forget(stream, name)  # absent rather than a stale or zero reading
                        log.warning("lag of %s/%s unavailable: %s", stream, name, error)
                        continue
                    health = monitor.observe(stream, name, lags)
                    collector.update(stream, name, lags, health=health.status)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            server.shutdown()
            thread.join(5)
    finally:
        await transport.close()
