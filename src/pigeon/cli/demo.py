"""``pigeon demo``: the order pipeline (`pigeon.demo`) against a broker, until Ctrl-C.

The same pipeline ``pigeon serve --demo`` runs, but as a client of any URL: a way to see
streams, groups, retries, lag and dead letters move on a broker of your choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..transport.base import Transport
from ._common import DEFAULT_URL, JsonOption, UrlOption, opened, run
from ._show import console, print_json

if TYPE_CHECKING:
    from ..demo import OrderPipeline

__all__ = ["demo"]

_GROUPS = ("billing", "shipping", "revenue-projection")


def demo(
    url: UrlOption = DEFAULT_URL,
    speed: Annotated[
        float, typer.Option(min=0.01, help="Order rate and warehouse speed, times normal.")
    ] = 1.0,
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between printed counts.")] = 3.0,
    as_json: JsonOption = False,
) -> None:
    """Run the demo order pipeline against the broker, printing counts, until Ctrl-C."""
    run("demo", _demo(url, speed, every, as_json))


async def _demo(url: str, speed: float, every: float, as_json: bool) -> None:
    # Imported here: the application layer is not needed by the other commands' start-up.
    from ..demo import OrderPipeline

    # The shipping group's idempotency marks live here for the run only.
    folder = Path(tempfile.mkdtemp(prefix="pigeon-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C and SIGTERM both end the demo cleanly (the pipeline stops, then the transport).
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with opened(url) as transport:
            pipeline = OrderPipeline(transport, folder, speed=speed)
            await pipeline.start()
            started = time.monotonic()
            try:
                console(stderr=True).print(
                    f"demo order pipeline running on {url}: streams demo-orders, demo-invoices "
                    "(Ctrl-C to stop)"
                )
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), every)
                    _print(await _reading(transport, pipeline, time.monotonic() - started), as_json)
            finally:
                await pipeline.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        shutil.rmtree(folder, ignore_errors=True)


async def _reading(transport: Transport, pipeline: OrderPipeline, elapsed: float) -> dict[str, Any]:
    from ..demo import ORDERS_STREAM

    lag = {}
    for group in _GROUPS:
        lag[group] = sum(p.lag for p in await transport.lag(ORDERS_STREAM, group))
    return {"elapsed_s": round(elapsed, 1), "counts": dict(sorted(pipeline.counts.items())), "lag": lag}


def _print(reading: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(reading)
        return
    counts = "  ".join(f"{name} {n}" for name, n in reading["counts"].items())
    lag = "  ".join(f"{group} {n}" for group, n in reading["lag"].items())
    console().print(f"{reading['elapsed_s']:>6.1f}s  {counts}  | lag: {lag}")
