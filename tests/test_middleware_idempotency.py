"""Idempotent consumers: a message delivered again after its effects committed is skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app_helpers import until
from pigeon.app import App, Context, Nack
from pigeon.app.middleware.idempotency import Idempotent
from pigeon.message import Headers
from pigeon.patterns.idempotency import RedisIdempotencyStore, SqlIdempotencyStore
from pigeon.testing.services import require_service, unique_name

SQL_URLS = {
    "sqlite": None,
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+aiomysql://root@127.0.0.1:3306/test",
}


@pytest.fixture(params=list(SQL_URLS))
async def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlIdempotencyStore]:
    kind = request.param
    if kind != "sqlite":
        require_service(kind)
    url = SQL_URLS[kind] or f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    store = SqlIdempotencyStore.from_url(url, table=unique_name("processed").replace("-", "_"))
    await store.create_table()
    effects = unique_name("effects").replace("-", "_")
    async with store.engine.begin() as connection:
        await connection.execute(text(f"CREATE TABLE {effects} (msg_id VARCHAR(64), amount INTEGER)"))
    store.effects_table = effects  # type: ignore[attr-defined]
    try:
        yield store
    finally:
        async with store.engine.begin() as connection:
            await connection.execute(text(f"DROP TABLE {effects}"))
            await connection.execute(text(f"DROP TABLE {store.table.name}"))
        await store.close()


def crash_after_commit(times: int) -> Any:
    """Fail *after* the inner layers (and the database commit) succeeded, before the ack:
    what a crash between commit and ack looks like to the broker."""
    left = [times]

    async def middleware(ctx: Context, call_next: Any) -> Any:
        result = await call_next(ctx)
        if left[0] > 0 and not ctx.state.get("duplicate"):
            left[0] -= 1
            raise Nack(delay=0.05, reason="crashed after commit")
        return result

    return middleware


async def effect_rows(store: SqlIdempotencyStore) -> list[tuple[str, int]]:
    async with store.engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT msg_id, amount FROM {store.effects_table}"))  # type: ignore[attr-defined]
        return sorted(((str(r[0]), int(r[1])) for r in rows), key=lambda row: row[1])


async def run_ledger(
    transport: Any, stream: str, prefix: str, store: SqlIdempotencyStore, crashes: int
) -> list[Any]:
    app = App(transport)
    calls: list[int] = []
    table = store.effects_table  # type: ignore[attr-defined]

    @app.subscriber(
        stream=stream, group="ledger", middleware=[crash_after_commit(crashes), Idempotent(store)]
    )
    async def record(payment: dict[str, int], ctx: Context) -> None:
        calls.append(payment["amount"])
        await ctx.session.execute(
            text(f"INSERT INTO {table} (msg_id, amount) VALUES (:m, :a)"),
            {"m": ctx.message.headers.get(Headers.ORIGINAL_MSG_ID) or ctx.message.id, "a": payment["amount"]},
        )

    async with app:
        acks = [await app.publish(f"{prefix}.pay", {"amount": n}) for n in range(1, 6)]
        assert await until(lambda: len(calls) >= 5)
        # Settled means acknowledged: nothing left for the group.
        assert await until_async(lambda: _lag_is_zero(transport, stream))
    return acks


async def _lag_is_zero(transport: Any, stream: str) -> bool:
    return sum(p.lag for p in await transport.lag(stream, "ledger")) == 0


async def until_async(check: Any, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_redelivery_after_the_commit_is_skipped_on_every_transport(
    any_transport: Any, make_stream: Any, tmp_path: Path
) -> None:
    stream, prefix = await make_stream()
    store = SqlIdempotencyStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await store.create_table()
    store.effects_table = "effects"  # type: ignore[attr-defined]
    async with store.engine.begin() as connection:
        await connection.execute(text("CREATE TABLE effects (msg_id VARCHAR(64), amount INTEGER)"))
    try:
        await run_ledger(any_transport, stream, prefix, store, crashes=3)
        rows = await effect_rows(store)
    finally:
        await store.close()
    assert [amount for _, amount in rows] == [1, 2, 3, 4, 5], "one effect per message despite 3 redeliveries"


async def test_the_claim_commits_with_the_handlers_writes_on_each_database(
    sql_store: SqlIdempotencyStore,
) -> None:
    from pigeon.transport import connect
    from pigeon.transport.base import StreamSpec

    transport = await connect("memory://")
    await transport.create_stream(StreamSpec("pay", ("pay.>",)))
    try:
        await run_ledger(transport, "pay", "pay", sql_store, crashes=2)
    finally:
        await transport.close()
    rows = await effect_rows(sql_store)
    assert [amount for _, amount in rows] == [1, 2, 3, 4, 5]


async def test_a_failing_handler_leaves_no_claim_and_no_effect(sql_store: SqlIdempotencyStore) -> None:
    from pigeon.app import RetryPolicy
    from pigeon.engine.groups.config import Backoff
    from pigeon.transport import connect
    from pigeon.transport.base import StreamSpec

    transport = await connect("memory://")
    await transport.create_stream(StreamSpec("pay", ("pay.>",)))
    app = App(transport)
    table = sql_store.effects_table  # type: ignore[attr-defined]
    attempts: list[int] = []

    @app.subscriber(
        stream="pay",
        group="ledger",
        middleware=[Idempotent(sql_store)],
        retry=RetryPolicy(max_attempts=3, backoff=Backoff(initial_s=0.05, jitter=0)),
    )
    async def record(payment: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await ctx.session.execute(text(f"INSERT INTO {table} (msg_id, amount) VALUES ('x', 1)"))
        if ctx.attempt < 2:
            raise ConnectionError("after writing, before commit")

    try:
        async with app:
            await app.publish("pay.in", {"amount": 1})
            assert await until(lambda: attempts == [1, 2])
            await asyncio.sleep(0.2)
    finally:
        await transport.close()
    assert await effect_rows(sql_store) == [("x", 1)], "the first attempt's write was rolled back"


async def test_redis_store_skips_duplicates(any_transport: Any, make_stream: Any) -> None:
    url = require_service("redis")
    stream, prefix = await make_stream()
    store = RedisIdempotencyStore.from_url(url, prefix=f"{unique_name('idem')}:")
    app = App(any_transport)
    calls: list[str] = []

    @app.subscriber(stream=stream, group="g", middleware=[crash_after_commit(2), Idempotent(store)])
    async def handle(text_: str) -> None:
        calls.append(text_)

    try:
        async with app:
            for word in ("a", "b", "c"):
                await app.publish(f"{prefix}.w", word)
            assert await until(lambda: len(calls) == 3)
            await asyncio.sleep(0.4)  # the two redeliveries have come and gone
    finally:
        keys = [k async for k in store.client.scan_iter(match=f"{store.prefix}*")]
        if keys:
            await store.client.delete(*keys)
        await store.close()
    assert sorted(calls) == ["a", "b", "c"]
