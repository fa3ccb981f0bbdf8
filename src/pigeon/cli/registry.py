"""``pigeon registry``: serve a Confluent-compatible schema registry over a data folder."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import PigeonError
from ..server.registry import DEFAULT_REGISTRY_PORT, RegistryOptions, run

__all__ = ["registry"]


def registry(
    data: Annotated[Path, typer.Option(help="The data folder (created if missing).")] = Path("pigeon-data"),
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="HTTP port of the registry (0 picks a free one).")
    ] = DEFAULT_REGISTRY_PORT,
    token: Annotated[
        str | None,
        typer.Option(envvar="PIGEON_TOKEN", help="Token every request must carry (needed off loopback)."),
    ] = None,
) -> None:
    """Serve the schema registry (Confluent's REST API) until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(RegistryOptions(data=data, host=host, port=port, token=token)))
    except (PigeonError, OSError) as error:
        typer.echo(f"pigeon registry: {error}", err=True)
        raise typer.Exit(1) from None
