"""``pigeon lag STREAM GROUP``: lag per partition, health and alert thresholds, as an exit code.

Against any transport URL (default: the local ``pigeon serve``) or a data folder (``--data``).
``--watch S`` samples every S seconds, with a trend arrow per partition and the group's health
once the window fills; without it, one reading. The exit status is the alerts' (0 none, 1 a
warning, 2 an error; docs/operations.md), so a script or a cron job can alert on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..engine.groups.lag import PartitionLag
from ..observe.alerts import Alert, Thresholds, check, exit_code
from ..observe.health import GroupHealth, HealthMonitor, HealthRules
from ..transport.base import Transport
from ..transport.embedded import EmbeddedTransport
from ._common import DEFAULT_URL, DataOption, JsonOption, UrlOption, opened, run

__all__ = ["lag"]


def lag(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    url: UrlOption = DEFAULT_URL,
    data: DataOption = None,
    watch: Annotated[float | None, typer.Option(min=0.1, help="Refresh every this many seconds.")] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="With --watch: stop after this many readings.")
    ] = None,
    max_lag: Annotated[int | None, typer.Option(min=0, help="Alert (exit 2) above this lag.")] = None,
    max_time_behind: Annotated[
        float | None,
        typer.Option(min=0, help="Alert (exit 2) when the oldest unprocessed message is older (s)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a group's lag per partition; the exit status says whether to worry."""
    thresholds = Thresholds(max_lag=max_lag, max_time_behind_s=max_time_behind)
    raise typer.Exit(run("lag", _lag(url, data, stream, group, watch, count, thresholds, as_json)))


async def _lag(
    url: str,
    data: Path | None,
    stream: str,
    group: str,
    watch: float | None,
    count: int | None,
    thresholds: Thresholds,
    as_json: bool,
) -> int:
    console = Console()
    monitor = HealthMonitor(HealthRules(window=10, min_samples=3))
    previous: dict[int, int] = {}
    readings = 0
    # At a terminal, --watch redraws one table in place; piped, each reading is printed.
    live = (
        Live(console=console, auto_refresh=False) if watch and console.is_terminal and not as_json else None
    )
    async with opened(url, data) as transport:
        with live or contextlib.nullcontext():
            while True:
                lags = await transport.lag(stream, group)
                health = monitor.observe(stream, group, lags)
                behind = _time_behind(transport, stream, lags)
                alerts = check(health, thresholds, behind)
                if as_json:
                    print(json.dumps(_json(health, lags, behind, alerts)), flush=True)
                elif live is not None:
                    live.update(_table(stream, group, lags, previous, behind, health, alerts), refresh=True)
                else:
                    console.print(_table(stream, group, lags, previous, behind, health, alerts))
                previous = {p.partition: p.lag for p in lags}
                readings += 1
                if watch is None or (count is not None and readings >= count):
                    return exit_code(alerts)
                await asyncio.sleep(watch)


def _time_behind(transport: Transport, stream: str, lags: list[PartitionLag]) -> dict[int, float | None]:
    """Age of the oldest unprocessed message per partition, where the transport can read it."""
    if not isinstance(transport, EmbeddedTransport):
        return {p.partition: None for p in lags}
    now = time.time()
    out: dict[int, float | None] = {}
    for p in lags:
        found = transport.engine.fetch(stream, p.partition, p.committed, 1) if p.lag else []
        out[p.partition] = max(0.0, now - found[0].timestamp) if found else 0.0
    return out


def _table(
    stream: str,
    group: str,
    lags: list[PartitionLag],
    previous: dict[int, int],
    behind: dict[int, float | None],
    health: GroupHealth,
    alerts: list[Alert],
) -> Table:
    table = Table(
        title=f"{stream} / {group}: {health.status.name}" + ("" if health.complete else " (warming up)")
    )
    for column in (
        "partition",
        "head",
        "committed",
        "lag",
        "trend",
        "in flight",
        "waiting",
        "behind",
        "owner",
    ):
        table.add_column(column, justify="left" if column in ("trend", "owner") else "right")
    for p in lags:
        before = previous.get(p.partition)
        trend = "" if before is None else "↑" if p.lag > before else "↓" if p.lag < before else "→"
        seconds = behind.get(p.partition)
        table.add_row(
            str(p.partition),
            str(p.head),
            str(p.committed),
            str(p.lag),
            trend,
            str(p.in_flight),
            str(p.waiting),
            "unknown" if seconds is None else f"{seconds:.1f}s",
            p.owner or "",
        )
    if alerts:
        table.caption = "\n".join(alert.message for alert in alerts)
    return table


def _json(
    health: GroupHealth, lags: list[PartitionLag], behind: dict[int, float | None], alerts: list[Alert]
) -> dict[str, object]:
    return {
        "stream": health.stream,
        "group": health.group,
        "status": health.status.name,
        "lag": sum(p.lag for p in lags),
        "partitions": [
            {
                "partition": p.partition,
                "head": p.head,
                "committed": p.committed,
                "lag": p.lag,
                "in_flight": p.in_flight,
                "waiting": p.waiting,
                "time_behind_s": behind.get(p.partition),
            }
            for p in lags
        ],
        "alerts": [{"kind": a.kind, "severity": a.severity, "message": a.message} for a in alerts],
    }
