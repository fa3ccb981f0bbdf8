"""``pigeon es``: event sourcing from the command line.

``rebuild`` drops a projection's read model and replays the event store's stream into it
from offset 0 with a new group, with a progress bar; ``history`` prints one aggregate's
stored events. Both open the data folder directly (``--data``), as the event store lives on
the embedded engine: not while a ``pigeon serve`` holds the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from ..engine import Engine
from ..errors import DataDirLockedError, InvalidConfigError, MissingExtraError, StreamNotFoundError
from ..es import AggregateNotFoundError, EventStore, ProjectionError
from ._common import JsonOption, confirm, fail, run
from ._show import console, print_json, progress_bars

__all__ = ["app"]

app = typer.Typer(
    help="Event sourcing: rebuild projections, show an aggregate's history.", no_args_is_help=True
)

DataArg = Annotated[Path, typer.Option("--data", help="The data folder holding the event store.")]
StreamOption = Annotated[str, typer.Option("--stream", help="The event store's stream.")]


@app.command("rebuild")
def rebuild(
    projection: Annotated[
        str,
        typer.Option(
            "--projection",
            metavar="MODULE:OBJECT",
            help="The projection: an instance, or a class or function that makes one.",
        ),
    ],
    db: Annotated[str, typer.Option("--db", help="The read model's SQLAlchemy async URL.")],
    data: DataArg,
    stream: StreamOption = "events",
    batch: Annotated[int, typer.Option(min=1, help="Events applied per SQL transaction.")] = 500,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before dropping the read model.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Drop a projection's read model and rebuild it from the whole event stream."""
    target = _load_projection(projection)
    confirm("es rebuild", f"Drop the read model of projection {target.name!r} and rebuild it?", yes)
    positions = run("es rebuild", _rebuild(target, db, data, stream, batch))
    applied = sum(positions.values())
    if as_json:
        print_json({"projection": target.name, "stream": stream, "events": applied, "positions": positions})
    else:
        console().print(f"rebuilt projection {target.name} from {applied} events of stream {stream}")


@app.command("history")
def history(
    aggregate_type: Annotated[str, typer.Argument(help="The aggregate type (its class's type_name).")],
    aggregate_id: Annotated[str, typer.Argument(help="The aggregate id.")],
    data: DataArg,
    stream: StreamOption = "events",
    as_json: JsonOption = False,
) -> None:
    """Print an aggregate's stored events, oldest first, as stored (before upcasting)."""
    events = run("es history", _history(data, stream, aggregate_type, aggregate_id))
    out = console()
    for event in events:
        if as_json:
            print_json(event)
        else:
            out.print(
                f"v{event['version']}  {event['time']}  {event['type']} (schema {event['schema']})  "
                f"{json.dumps(event['data'], ensure_ascii=False)}"
            )


def _load_projection(spec: str) -> Any:
    from ..es.projection import Projection  # the sql extra: only when a projection is used

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        fail("es rebuild", f"--projection takes MODULE:OBJECT, not {spec!r}", code=2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to the caller
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except ImportError as error:
        fail("es rebuild", f"cannot import {module_name}: {error}", code=2)
    except AttributeError:
        fail("es rebuild", f"{module_name} has no {attribute}", code=2)
    if (isinstance(found, type) and issubclass(found, Projection)) or (
        callable(found) and not isinstance(found, type | Projection)
    ):
        try:
            found = found()
        except Exception as error:  # the user's code: whatever it raises is their mistake to see
            fail("es rebuild", f"{spec}() failed: {type(error).__name__}: {error}", code=2)
    if not isinstance(found, Projection):
        fail("es rebuild", f"{spec} is not a pigeon.es.projection.Projection (nor makes one)", code=2)
    return found


@contextlib.asynccontextmanager
async def _store(data: Path, stream: str) -> AsyncIterator[EventStore]:
    if not await asyncio.to_thread(data.is_dir):
        raise InvalidConfigError(f"no data folder at {data}")
    try:
        engine = await Engine.open(data)
    except DataDirLockedError as error:
        raise DataDirLockedError(
            f"data folder {data} is held by process {error.pid or 'unknown'} (a running pigeon serve?): "
            "stop it first, the event store needs the folder itself",
            pid=error.pid,
        ) from None
    try:
        if stream not in engine.streams():
            raise StreamNotFoundError(f"no stream named {stream!r} in {data}")
        yield await EventStore.open(engine, stream)
    finally:
        await engine.close()


async def _rebuild(projection: Any, db_url: str, data: Path, stream: str, batch: int) -> dict[int, int]:
    try:
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError
        from sqlalchemy.ext.asyncio import create_async_engine

        from ..es.projection import ProjectionRunner
    except ImportError as error:
        raise MissingExtraError(
            f"projections need the sql extra (pip install 'pigeon[sql]'): {error}"
        ) from None
    try:
        db = create_async_engine(db_url)
    except ArgumentError as error:
        raise InvalidConfigError(f"--db {db_url!r} is not a database URL: {error}") from None
    except ImportError as error:
        raise MissingExtraError(f"no driver for --db {db_url!r}: {error}") from None
    try:
        async with _store(data, stream) as store:
            runner = ProjectionRunner(store, projection, db, batch=batch)
            with progress_bars() as progress:
                task = progress.add_task(f"rebuilding {projection.name}", total=None)
                try:
                    await runner.rebuild(
                        lambda done, total: progress.update(task, completed=done, total=total)
                    )
                finally:
                    await runner.stop()
            return dict(runner.positions)
    except SQLAlchemyError as error:
        raise ProjectionError(f"the read model's database failed: {error}") from None
    finally:
        await db.dispose()


async def _history(data: Path, stream: str, aggregate_type: str, aggregate_id: str) -> list[dict[str, Any]]:
    async with _store(data, stream) as store:
        stored = await store.read_stored(aggregate_type, aggregate_id)
    if not stored:
        raise AggregateNotFoundError(f"{aggregate_type} {aggregate_id!r} has no events in stream {stream!r}")
    out = []
    for event in stored:
        try:
            payload: Any = json.loads(event.payload)
        except ValueError:
            payload = event.payload.decode(errors="replace")
        out.append(
            {
                "version": event.version,
                "type": event.event_type,
                "schema": event.schema_version,
                "time": datetime.fromtimestamp(event.timestamp, UTC).isoformat(timespec="milliseconds"),
                "offset": event.position.offset,
                "partition": event.position.partition,
                "metadata": dict(event.metadata),
                "data": payload,
            }
        )
    return out
