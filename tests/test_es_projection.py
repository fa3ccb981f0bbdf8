"""Projections into SQL read models (SQLite and the machine's PostgreSQL): live updates,
read-your-writes, restarts, rebuilds equal to the live model, and failures that stop cleanly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pigeon.engine import Engine
from pigeon.errors import InvalidNameError
from pigeon.es import EventRegistry, EventStore, ProjectionError, RecordedEvent, domain_event, handles
from pigeon.es.projection import Projection, ProjectionRunner, read_positions, wait_for_position
from pigeon.testing.services import require_service, unique_name


@domain_event("TallyStarted")
@dataclass(frozen=True)
class Started:
    label: str


@domain_event("TallyAdded")
@dataclass(frozen=True)
class Added:
    amount: int


@domain_event("TallyNoted")
@dataclass(frozen=True)
class Noted:
    text: str


class Tallies(Projection):
    def __init__(self, name: str, table: str, fail_on: int | None = None) -> None:
        self.name = name
        self.fail_on = fail_on
        self.metadata = MetaData()
        self.table = Table(
            table,
            self.metadata,
            Column("id", String(64), primary_key=True),
            Column("label", String(64)),
            Column("total", Integer),
            Column("applied", Integer),
        )

    @handles(Started)
    async def _started(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        await conn.execute(
            self.table.insert().values(
                id=recorded.aggregate_id, label=recorded.event.label, total=0, applied=1
            )
        )

    @handles(Added)
    async def _added(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        if recorded.event.amount == self.fail_on:
            raise RuntimeError("cannot add that")
        c = self.table.c
        await conn.execute(
            update(self.table)
            .where(c.id == recorded.aggregate_id)
            .values(total=c.total + recorded.event.amount, applied=c.applied + 1)
        )

    async def rows(self, db: AsyncEngine) -> list[tuple[Any, ...]]:
        async with db.connect() as conn:
            return [tuple(r) for r in await conn.execute(select(self.table).order_by(self.table.c.id))]


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'read.db'}"
    else:
        url = require_service("postgres").replace("postgresql://", "postgresql+asyncpg://")
    engine = create_async_engine(url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    engine = await Engine.open(data_dir)
    yield engine
    await engine.close()


@pytest.fixture
async def store(engine: Engine) -> EventStore:
    return await EventStore.open(
        engine, unique_name("es"), registry=EventRegistry([Started, Added, Noted]), durability="never"
    )


@pytest.fixture
async def names(db: AsyncEngine) -> AsyncIterator[dict[str, str]]:
    """A projection name, its table and a positions table; both tables dropped at the end."""
    made = {
        "name": unique_name("p"),
        "table": unique_name("tally").replace("-", "_"),
        "positions": unique_name("pos").replace("-", "_"),
    }
    yield made
    async with db.begin() as conn:
        for table in (made["table"], made["positions"]):
            await conn.execute(text(f'DROP TABLE IF EXISTS "{table}"'))


def _runner(store: EventStore, db: AsyncEngine, names: dict[str, str], **kwargs: Any) -> ProjectionRunner:
    projection = Tallies(names["name"], names["table"], kwargs.pop("fail_on", None))
    return ProjectionRunner(store, projection, db, positions_table_name=names["positions"], **kwargs)


async def _history(store: EventStore, tallies: int, adds: int) -> None:
    for t in range(tallies):
        await store.append("Tally", f"t{t}", [Started(f"label {t}")], expected_version=0)
    for i in range(adds):
        t = i % tallies
        version = store.version("Tally", f"t{t}")
        await store.append("Tally", f"t{t}", [Added(i + 1), Noted("n")], expected_version=version)


def _expected(tallies: int, adds: int) -> list[tuple[Any, ...]]:
    rows = {t: [f"t{t}", f"label {t}", 0, 1] for t in range(tallies)}
    for i in range(adds):
        rows[i % tallies][2] += i + 1
        rows[i % tallies][3] += 1
    return sorted(tuple(r) for r in rows.values())


async def test_live_projection_and_read_your_writes(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    await _history(store, 3, 20)
    runner = _runner(store, db, names, batch=7)
    async with runner:
        await runner.catch_up(timeout=20)
        assert await runner.projection.rows(db) == _expected(3, 20)  # type: ignore[attr-defined]
        result = await store.append(
            "Tally", "t0", [Added(1000)], expected_version=store.version("Tally", "t0")
        )
        await runner.wait_for(result, timeout=10)
        rows = await runner.projection.rows(db)  # type: ignore[attr-defined]
        assert rows[0][2] == _expected(3, 20)[0][2] + 1000
        await wait_for_position(db, names["name"], result, timeout=5, table=names["positions"])
        async with db.connect() as conn:
            assert await read_positions(conn, names["name"], names["positions"]) == {
                0: result.last.offset + 1
            }


async def test_a_restart_continues_without_applying_twice(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    await _history(store, 2, 10)
    async with _runner(store, db, names) as runner:
        await runner.catch_up(timeout=20)
    await _history_more(store)
    async with _runner(store, db, names) as runner:
        await runner.catch_up(timeout=20)
        rows = await runner.projection.rows(db)  # type: ignore[attr-defined]
    expected = _expected(2, 10)
    assert rows == [(*expected[0][:2], expected[0][2] + 5, expected[0][3] + 1), expected[1]]


async def _history_more(store: EventStore) -> None:
    await store.append("Tally", "t0", [Added(5)], expected_version=store.version("Tally", "t0"))


async def test_rebuild_equals_the_live_model(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    await _history(store, 4, 40)
    runner = _runner(store, db, names, batch=9)
    async with runner:
        await runner.catch_up(timeout=20)
        live = await runner.projection.rows(db)  # type: ignore[attr-defined]
        group_before = runner.group
        seen: list[tuple[int, int]] = []
        await runner.rebuild(lambda done, total: seen.append((done, total)), timeout=30)
        rebuilt = await runner.projection.rows(db)  # type: ignore[attr-defined]
        assert rebuilt == live == _expected(4, 40)
        assert seen[-1] == (sum(store.end()), sum(store.end()))
        assert seen[0][0] < seen[-1][0]  # progress was reported on the way
        assert runner.group == group_before
        # still live after the rebuild
        result = await store.append("Tally", "t1", [Added(7)], expected_version=store.version("Tally", "t1"))
        await runner.wait_for(result)


async def test_an_emptied_read_model_is_refilled(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    await _history(store, 2, 6)
    async with _runner(store, db, names) as runner:
        await runner.catch_up(timeout=20)
    async with db.begin() as conn:  # an operator restores an empty database
        await conn.execute(text(f'DROP TABLE "{names["table"]}"'))
        await conn.execute(text(f'DELETE FROM "{names["positions"]}"'))
    async with _runner(store, db, names) as runner:
        await runner.catch_up(timeout=20)
        assert await runner.projection.rows(db) == _expected(2, 6)  # type: ignore[attr-defined]


async def test_a_failing_projection_stops_and_reports(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    await _history(store, 1, 3)
    runner = _runner(store, db, names, fail_on=2, batch=100)
    await runner.start()
    with pytest.raises(ProjectionError, match="cannot add that"):
        await runner.catch_up(timeout=10)
    with pytest.raises(ProjectionError, match="cannot add that"):
        await runner.stop()
    async with db.connect() as conn:  # the failed batch's transaction was rolled back whole
        assert await read_positions(conn, names["name"], names["positions"]) == {}
        assert (await conn.execute(select(runner.projection.table))).all() == []  # type: ignore[attr-defined]
    with pytest.raises(ProjectionError, match="not running"):
        await runner.catch_up()


async def test_bad_projection_names_and_double_starts(
    store: EventStore, db: AsyncEngine, names: dict[str, str]
) -> None:
    with pytest.raises(InvalidNameError):
        ProjectionRunner(store, Tallies("bad name", "t"), db)
    runner = _runner(store, db, names)
    await runner.start()
    try:
        with pytest.raises(ProjectionError, match="running already"):
            await runner.start()
    finally:
        await runner.stop()


async def test_unknown_event_types_the_projection_ignores_are_not_decoded(
    engine: Engine, db: AsyncEngine, names: dict[str, str]
) -> None:
    stream = unique_name("es")
    writer = await EventStore.open(engine, stream, registry=EventRegistry([Started, Added, Noted]))
    await _history(writer, 1, 2)
    reader = EventStore(engine, stream, EventRegistry())  # knows nothing: learns only Tallies' events
    async with _runner(reader, db, names) as runner:
        await runner.catch_up(timeout=10)
        assert await runner.projection.rows(db) == _expected(1, 2)  # type: ignore[attr-defined]


async def test_a_store_with_several_partitions(
    engine: Engine, db: AsyncEngine, names: dict[str, str]
) -> None:
    store = await EventStore.open(
        engine, unique_name("es"), registry=EventRegistry([Started, Added, Noted]), partitions=3
    )
    await _history(store, 6, 30)
    assert sum(1 for n in store.end() if n > 0) > 1  # the tallies are spread over partitions
    async with _runner(store, db, names, batch=4) as runner:
        await runner.catch_up(timeout=20)
        assert await runner.projection.rows(db) == _expected(6, 30)  # type: ignore[attr-defined]
        async with db.connect() as conn:
            stored = await read_positions(conn, names["name"], names["positions"])
        assert stored == {p: end for p, end in enumerate(store.end()) if end}
        await runner.rebuild(timeout=20)
        assert await runner.projection.rows(db) == _expected(6, 30)  # type: ignore[attr-defined]
