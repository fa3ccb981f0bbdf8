"""The SQL idempotency store on SQLite (a file), PostgreSQL and MariaDB: duplicates per scope,
the handler's writes committing or rolling back with the claim, concurrent claims of one key,
retention, and the refusals.

Every test works in tables of its own, dropped at the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, update
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from pigeon.errors import InvalidConfigError, InvalidIdempotencyKeyError, InvalidNameError
from pigeon.patterns.idempotency import SqlIdempotencyStore
from pigeon.testing.services import require_service, unique_name

URLS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+aiomysql://root@127.0.0.1:3306/test",
}


def table_name(prefix: str) -> str:
    return unique_name(prefix).replace("-", "_")


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'idempotency.db'}"
    require_service(request.param)
    return URLS[request.param]


@pytest.fixture
async def store(url: str) -> AsyncIterator[SqlIdempotencyStore]:
    store = SqlIdempotencyStore.from_url(url, table=table_name("idem"))
    await store.create_table()
    try:
        yield store
    finally:
        async with store.engine.begin() as connection:
            await connection.run_sync(store.table.drop)
        await store.close()


@pytest.fixture
async def user_table(store: SqlIdempotencyStore) -> AsyncIterator[Table]:
    """A table of the application's own, written by handlers in ``claim.session``."""
    table = Table(
        table_name("orders"),
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("note", String(50)),
    )
    async with store.engine.begin() as connection:
        await connection.run_sync(table.create)
    try:
        yield table
    finally:
        async with store.engine.begin() as connection:
            await connection.run_sync(table.drop)


async def count(store: SqlIdempotencyStore, table: Table) -> int:
    async with store.engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


async def is_duplicate(store: SqlIdempotencyStore, key: str, scope: str) -> bool:
    async with store.claim(key, scope=scope) as claim:
        return claim.duplicate


async def test_a_committed_claim_is_a_duplicate_in_its_scope_only(store: SqlIdempotencyStore) -> None:
    async with store.claim("m1", scope="billing") as claim:
        assert not claim.duplicate
        assert isinstance(claim.session, AsyncSession)
    async with store.claim("m1", scope="billing") as again:
        assert again.duplicate
        assert again.session is None
    assert not await is_duplicate(store, "m1", scope="shipping")
    assert not await is_duplicate(store, "m2", scope="billing")
    assert await count(store, store.table) == 3


async def test_keys_compare_exactly(store: SqlIdempotencyStore) -> None:
    # MySQL's default collations would call these equal (case, trailing spaces).
    for key in ("abc", "ABC", "abc ", "ábc"):
        assert not await is_duplicate(store, key, scope="g"), key
    assert await is_duplicate(store, "abc ", scope="g")


async def test_the_longest_keys_fit(store: SqlIdempotencyStore) -> None:
    key, scope = "é" * 255, "ß" * 255  # multi-byte characters: 255 characters, 510 bytes
    assert not await is_duplicate(store, key, scope)
    assert await is_duplicate(store, key, scope)


async def test_handler_writes_commit_with_the_claim(store: SqlIdempotencyStore, user_table: Table) -> None:
    async with store.claim("m1", scope="g") as claim:
        await claim.session.execute(user_table.insert().values(id=1, note="shipped"))
    async with store.engine.connect() as connection:
        notes = (await connection.execute(select(user_table.c.note))).scalars().all()
    assert notes == ["shipped"]
    assert await is_duplicate(store, "m1", scope="g")


async def test_an_exception_records_neither_the_claim_nor_the_writes(
    store: SqlIdempotencyStore, user_table: Table
) -> None:
    with pytest.raises(RuntimeError, match="handler failed"):
        async with store.claim("m1", scope="g") as claim:
            await claim.session.execute(user_table.insert().values(id=1, note="half done"))
            raise RuntimeError("handler failed")
    assert await count(store, user_table) == 0
    assert await count(store, store.table) == 0
    assert not await is_duplicate(store, "m1", scope="g")


async def test_exiting_a_duplicate_writes_nothing(store: SqlIdempotencyStore) -> None:
    assert not await is_duplicate(store, "m1", scope="g")
    with pytest.raises(RuntimeError):
        async with store.claim("m1", scope="g") as claim:
            assert claim.duplicate
            raise RuntimeError("the caller failed while skipping")
    assert await is_duplicate(store, "m1", scope="g")
    assert await count(store, store.table) == 1


async def race(
    store: SqlIdempotencyStore, user_table: Table, first_body: Callable[[], Awaitable[None]]
) -> tuple[list[str], float, float, object]:
    """Two consumers claim one key; the first holds its transaction open in ``first_body``.

    Returns who processed it, when the first's handler finished (its commit or rollback comes
    next), when the second's claim returned, and how the first ended (None or its exception).
    """
    processed: list[str] = []
    first_claimed = asyncio.Event()
    first_done = 0.0

    async def first() -> None:
        nonlocal first_done
        async with store.claim("m1", scope="g") as claim:
            assert not claim.duplicate
            await claim.session.execute(user_table.insert().values(id=1, note="first"))
            first_claimed.set()
            try:
                await first_body()
                processed.append("first")
            finally:
                first_done = time.monotonic()

    async def second() -> float:
        await first_claimed.wait()
        async with store.claim("m1", scope="g") as claim:
            claimed_at = time.monotonic()
            if not claim.duplicate:
                await claim.session.execute(user_table.insert().values(id=2, note="second"))
                processed.append("second")
        return claimed_at

    results = await asyncio.wait_for(asyncio.gather(first(), second(), return_exceptions=True), 30)
    assert not isinstance(results[1], BaseException), results[1]
    return processed, first_done, results[1], results[0]


async def test_a_concurrent_claim_waits_and_becomes_a_duplicate(
    store: SqlIdempotencyStore, user_table: Table
) -> None:
    processed, first_done, second_claimed, first_outcome = await race(
        store, user_table, lambda: asyncio.sleep(0.5)
    )
    assert first_outcome is None
    assert processed == ["first"]
    assert second_claimed >= first_done
    assert await count(store, user_table) == 1


async def test_a_concurrent_claim_proceeds_when_the_first_rolls_back(
    store: SqlIdempotencyStore, user_table: Table
) -> None:
    async def fail() -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("first handler failed")

    processed, first_done, second_claimed, first_outcome = await race(store, user_table, fail)
    assert isinstance(first_outcome, RuntimeError)
    assert processed == ["second"]
    assert second_claimed >= first_done
    async with store.engine.connect() as connection:
        notes = (await connection.execute(select(user_table.c.note))).scalars().all()
    assert notes == ["second"]


async def test_forget_older_than_deletes_old_marks(store: SqlIdempotencyStore) -> None:
    for key in ("old1", "old2", "recent"):
        assert not await is_duplicate(store, key, scope="g")
    long_ago = datetime.now() - timedelta(days=30)  # naive UTC or local: a month back either way
    async with store.engine.begin() as connection:
        await connection.execute(
            update(store.table).where(store.table.c.message_id.like("old%")).values(processed_at=long_ago)
        )
    assert await store.forget_older_than(24 * 3600) == 2
    assert await store.forget_older_than(24 * 3600) == 0
    assert await is_duplicate(store, "recent", scope="g")
    assert not await is_duplicate(store, "old1", scope="g")
    with pytest.raises(InvalidConfigError):
        await store.forget_older_than(-1)


@pytest.mark.parametrize(
    ("key", "scope"), [("", "g"), ("m", ""), ("k" * 256, "g"), ("m", "s" * 256), (None, "g"), ("m", 7)]
)
async def test_bad_keys_and_scopes_are_refused(
    store: SqlIdempotencyStore, key: object, scope: object
) -> None:
    with pytest.raises(InvalidIdempotencyKeyError):
        async with store.claim(key, scope=scope):  # type: ignore[arg-type]
            pytest.fail("a bad key was claimed")
    assert await count(store, store.table) == 0


async def test_create_table_is_idempotent_even_concurrently(url: str) -> None:
    name = table_name("idem")
    stores = [SqlIdempotencyStore.from_url(url, table=name) for _ in range(3)]
    try:
        await asyncio.wait_for(asyncio.gather(*(store.create_table() for store in stores)), 30)
        await stores[0].create_table()
        assert not await is_duplicate(stores[0], "m1", scope="g")
        assert await is_duplicate(stores[1], "m1", scope="g")
    finally:
        async with stores[0].engine.begin() as connection:
            await connection.run_sync(stores[0].table.drop, checkfirst=True)
        for store in stores:
            await store.close()


async def test_close_disposes_only_an_engine_the_store_created(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    engine = create_async_engine(url)
    given = SqlIdempotencyStore(engine)
    assert given.table.name == "pigeon_processed_messages"
    await given.create_table()
    assert engine.pool.checkedin() == 1
    await given.close()
    assert engine.pool.checkedin() == 1
    await engine.dispose()

    made = SqlIdempotencyStore.from_url(url)
    assert await is_duplicate(made, "m0", scope="g") is False
    assert made.engine.pool.checkedin() == 1
    await made.close()
    assert made.engine.pool.checkedin() == 0


@pytest.mark.parametrize("name", ["", "1table", "bad-name", "x" * 51, "t; DROP TABLE users"])
def test_bad_table_names_are_refused(name: str, tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(InvalidNameError):
        SqlIdempotencyStore(engine, table=name)


class OtherDialect(SQLiteDialect_aiosqlite):
    """A database the store knows nothing about (third-party dialects subclass like this)."""

    name = "otherdb"


def test_an_unsupported_dialect_is_refused_by_name() -> None:
    registry.register("otherdb.aiosqlite", __name__, "OtherDialect")
    engine = create_async_engine("otherdb+aiosqlite://")
    with pytest.raises(InvalidConfigError, match=r"'otherdb'.*postgresql, sqlite, mysql, mariadb"):
        SqlIdempotencyStore(engine)


def test_the_package_imports_without_sqlalchemy_or_redis() -> None:
    code = (
        "import sys\n"
        "sys.modules['sqlalchemy'] = sys.modules['redis'] = None\n"
        "import pigeon.patterns.idempotency as idempotency\n"
        "from pigeon.errors import MissingExtraError\n"
        "assert idempotency.Claim(duplicate=True).session is None\n"
        "for name in ('SqlIdempotencyStore', 'RedisIdempotencyStore'):\n"
        "    try:\n"
        "        getattr(idempotency, name)\n"
        "    except MissingExtraError as exc:\n"
        "        print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "SqlIdempotencyStore needs sqlalchemy: pip install 'pigeon[sql]'",
        "RedisIdempotencyStore needs redis: pip install 'pigeon[redis]'",
    ]
