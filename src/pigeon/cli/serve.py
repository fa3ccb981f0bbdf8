"""``pigeon serve``: run the NATS server (with JetStream) over a data folder."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import Durability
from ..errors import PigeonError
from ..server.busy_poll import MAX_BUSY_POLL_US, loop_factory
from ..server.http import DEFAULT_HTTP_PORT
from ..server.nats import DEFAULT_PORT
from ..server.serve import ServeOptions, run

__all__ = ["serve"]


def serve(
    data: Annotated[Path, typer.Option(help="The data folder (created if missing).")] = Path("pigeon-data"),
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="NATS client port (0 picks a free one).")
    ] = DEFAULT_PORT,
    http_port: Annotated[
        int, typer.Option(min=0, max=65535, help="HTTP port for /healthz (0 picks a free one).")
    ] = DEFAULT_HTTP_PORT,
    host: Annotated[str, typer.Option(help="The address both servers listen on.")] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="PIGEON_TOKEN",
            help="Token the admin API and the schema registry require (needed off loopback).",
        ),
    ] = None,
    registry_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Also serve the schema registry at the root of this port, for Confluent clients "
            "(it is always under /registry on the HTTP port).",
        ),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Run a demo order pipeline through the server (needs pigeon[nats,sql])."),
    ] = False,
    durability: Annotated[
        Durability,
        typer.Option(
            help="Durability of the streams JetStream clients create: 'always' fsyncs before each "
            "PubAck, 'interval' every 100 ms, 'never' leaves it to the OS."
        ),
    ] = "interval",
    busy_poll: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_BUSY_POLL_US,
            help="Microseconds to keep polling for the next request before sleeping, once busy: "
            "lower latency for CPU time (docs/architecture.md). 0 sleeps at once.",
        ),
    ] = 0,
) -> None:
    """Serve the data folder to NATS clients (core and JetStream) until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(
        data=data,
        host=host,
        port=port,
        http_port=http_port,
        token=token,
        registry_port=registry_port,
        demo=demo,
        durability=durability,
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory(busy_poll)) as runner:
            runner.run(run(options))
    except (PigeonError, OSError) as error:
        typer.echo(f"pigeon serve: {error}", err=True)
        raise typer.Exit(1) from None
