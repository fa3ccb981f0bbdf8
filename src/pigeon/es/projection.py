"""Projections: read models in SQL tables, kept up to date from the event store's stream.

A `ProjectionRunner` reads the stream through an ordered consumer group (each partition in
offset order) and applies each fetched batch in one SQL transaction that also stores, per
partition, the next offset to apply. The SQL position is the truth: events below it are
skipped, so a crash anywhere (before the commit: nothing of the batch happened; after it:
the redelivered batch is skipped) never applies an event twice or skips one. The group's
own committed offset only saves rereading.

Needs the ``sql`` extra (SQLAlchemy with an async driver: aiosqlite, asyncpg, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import ClassVar

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..engine import OrderedGroupConfig, OrderedMember, StartAt
from ..engine.config import validate_name
from ..engine.groups import Delivery
from ..errors import GroupNotFoundError, InvalidConfigError
from .errors import ProjectionError
from .events import event_type_of
from .handlers import handler_table
from .store import AppendResult, EventStore, Position, RecordedEvent, stored_event

__all__ = ["POSITIONS_TABLE", "Projection", "ProjectionRunner", "read_positions", "wait_for_position"]

POSITIONS_TABLE = "pigeon_projection_positions"
Progress = Callable[[int, int], None]


class Projection:
    """Base of projections: a ``name`` (its identity in the positions table and its group),
    the tables it owns in ``metadata`` (created by `setup`, dropped by `drop`; override both
    for anything else), and ``@handles(EventClass)`` methods ``async (self, conn, recorded)``.
    Events it has no method for are skipped without being decoded."""

    name: str
    metadata: MetaData | None = None
    _handlers: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = handler_table(cls)

    @classmethod
    def event_classes(cls) -> tuple[type, ...]:
        return tuple(cls._handlers)

    async def setup(self, conn: AsyncConnection) -> None:
        if self.metadata is not None:
            await conn.run_sync(self.metadata.create_all)

    async def drop(self, conn: AsyncConnection) -> None:
        if self.metadata is not None:
            await conn.run_sync(self.metadata.drop_all)

    async def apply(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        method = self._handlers.get(type(recorded.event))
        if method is not None:
            await getattr(self, method)(conn, recorded)


def positions_table(name: str = POSITIONS_TABLE) -> Table:
    return Table(
        name,
        MetaData(),
        Column("projection", String(64), primary_key=True),
        Column("partition", Integer, primary_key=True, autoincrement=False),
        Column("next_offset", BigInteger, nullable=False),
    )


async def read_positions(
    conn: AsyncConnection, projection: str, table: str = POSITIONS_TABLE
) -> dict[int, int]:
    """Per partition, the next offset ``projection`` will apply (absent: from the start)."""
    positions = positions_table(table)
    rows = await conn.execute(
        select(positions.c.partition, positions.c.next_offset).where(positions.c.projection == projection)
    )
    return {int(p): int(o) for p, o in rows}


async def wait_for_position(
    db: AsyncEngine,
    projection: str,
    position: Position | AppendResult,
    *,
    timeout: float = 10.0,
    poll_s: float = 0.02,
    table: str = POSITIONS_TABLE,
) -> None:
    """Read-your-writes from anywhere that reaches the database: wait until the read model
    includes the event at ``position`` (an append's result: its last event)."""
    target = position.last if isinstance(position, AppendResult) else position
    deadline = time.monotonic() + timeout
    while True:
        async with db.connect() as conn:
            if (await read_positions(conn, projection, table)).get(target.partition, 0) > target.offset:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"projection {projection!r} did not reach {target} within {timeout}s")
        await asyncio.sleep(poll_s)


class ProjectionRunner:
    """Runs one projection against one database; `start`, then `stop` (or `run_until_caught_up`)."""

    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        db: AsyncEngine,
        *,
        batch: int = 100,
        positions_table_name: str = POSITIONS_TABLE,
    ) -> None:
        if not isinstance(projection, Projection):
            raise InvalidConfigError(f"a projection is a Projection subclass instance, not {projection!r}")
        name = getattr(projection, "name", None)
        validate_name(name, "projection")
        if len(str(name)) > 59:  # the group's name adds a prefix and must stay within 64
            raise InvalidConfigError(f"projection name {name!r} is longer than 59 characters")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidConfigError(f"batch must be a positive integer, not {batch!r}")
        self.store = store
        self.projection = projection
        self.db = db
        self.batch = batch
        self.group = f"proj-{projection.name}"
        self._table = positions_table(positions_table_name)
        self._handled = {event_type_of(cls)[0] for cls in projection.event_classes()}
        store.registry.register(*projection.event_classes())
        self.positions: dict[int, int] = {}
        self._member: OrderedMember | None = None
        self._task: asyncio.Task[None] | None = None
        self._advanced = asyncio.Event()
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise ProjectionError(f"projection {self.projection.name!r} is running already")
        async with self.db.begin() as conn:
            await conn.run_sync(self._table.metadata.create_all)
            await self.projection.setup(conn)
            self.positions = await read_positions(conn, self.projection.name, self._table.name)
        engine = self.store.engine
        group = await engine.ordered_group(
            self.store.stream, OrderedGroupConfig(self.group, commit="batch", dead_letter=False)
        )
        ahead = [lag.committed > self.positions.get(lag.partition, 0) for lag in group.lag()]
        if any(ahead):
            # The read model is behind the group (its tables were restored or emptied): the
            # group must deliver again from where the read model is.
            lowest = min(self.positions.get(lag.partition, 0) for lag in group.lag())
            await group.reset_offsets(StartAt.offset(lowest))
        self._error = None
        self._member = await group.join(f"runner-{id(self)}")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop applying; a failed projection raises its `ProjectionError` here."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        member, self._member = self._member, None
        if member is not None and not member.removed:
            await member.leave()
        self._raise_if_failed()

    async def __aenter__(self) -> ProjectionRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- applying -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._member is not None
        member = self._member
        try:
            while True:
                deliveries = await member.fetch(self.batch, 1.0)
                if deliveries:
                    await self._apply(deliveries)
                    await member.ack_batch(deliveries)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a projection bug or a database failure: stop and report
            self._error = exc
            self._advanced.set()

    async def _apply(self, deliveries: list[Delivery]) -> None:
        fresh = [d for d in deliveries if _offset(d) >= self.positions.get(_partition(d), 0)]
        if not fresh:
            return  # applied before a crash, acknowledged only now
        moved: dict[int, int] = {}
        async with self.db.begin() as conn:
            for delivery in fresh:
                stored = stored_event(delivery.message)
                if stored.event_type in self._handled:
                    await self.projection.apply(conn, self.store.decode(stored))
                moved[_partition(delivery)] = _offset(delivery) + 1
            for partition, next_offset in moved.items():
                await self._store_position(conn, partition, next_offset)
        self.positions.update(moved)
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _store_position(self, conn: AsyncConnection, partition: int, next_offset: int) -> None:
        table = self._table
        where = (table.c.projection == self.projection.name) & (table.c.partition == partition)
        result = await conn.execute(update(table).where(where).values(next_offset=next_offset))
        if result.rowcount == 0:
            await conn.execute(
                table.insert().values(
                    projection=self.projection.name, partition=partition, next_offset=next_offset
                )
            )

    # -- waiting ------------------------------------------------------------------------------------

    def reached(self, position: Position | AppendResult) -> bool:
        target = position.last if isinstance(position, AppendResult) else position
        return self.positions.get(target.partition, 0) > target.offset

    async def wait_for(self, position: Position | AppendResult, timeout: float = 10.0) -> None:
        """Read-your-writes: return once the read model includes the event at ``position``."""
        async with asyncio.timeout(timeout):
            while not self.reached(position):
                self._raise_if_failed()
                await self._advanced.wait()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            raise ProjectionError(f"projection {self.projection.name!r} failed: {error!r}") from error

    async def catch_up(self, progress: Progress | None = None, *, timeout: float | None = None) -> None:
        """Wait until every event stored when called is applied; ``progress(done, total)``."""
        if self._task is None:
            raise ProjectionError(f"projection {self.projection.name!r} is not running: start it first")
        end = self.store.end()
        start = dict(self.positions)
        total = sum(max(0, e - start.get(p, 0)) for p, e in enumerate(end))
        async with asyncio.timeout(timeout):
            while True:
                self._raise_if_failed()
                done = sum(
                    max(0, min(self.positions.get(p, 0), e) - start.get(p, 0)) for p, e in enumerate(end)
                )
                if progress is not None:
                    progress(done, total)
                if done >= total:
                    return
                await self._advanced.wait()

    async def rebuild(self, progress: Progress | None = None, *, timeout: float | None = None) -> None:
        """Drop the read model and apply the whole stream again from offset 0 with a new group;
        the runner keeps running afterwards."""
        await self.stop()
        with contextlib.suppress(GroupNotFoundError):
            await self.store.engine.delete_group(self.store.stream, self.group)
        async with self.db.begin() as conn:
            await self.projection.drop(conn)
            await conn.run_sync(self._table.metadata.create_all)
            await conn.execute(delete(self._table).where(self._table.c.projection == self.projection.name))
        await self.start()
        await self.catch_up(progress, timeout=timeout)


def _offset(delivery: Delivery) -> int:
    assert delivery.message.offset is not None
    return delivery.message.offset


def _partition(delivery: Delivery) -> int:
    assert delivery.message.partition is not None
    return delivery.message.partition
