"""A PostgreSQL queue table read with ``FOR UPDATE SKIP LOCKED``, through asyncpg.

One table per run (``id bigserial``, ``payload bytea``), dropped at the end. A publish is one
autocommitted ``INSERT`` (durable at commit, with the server's ``synchronous_commit``);
pipelined is 1000 rows by ``executemany`` in one transaction. A per-message ack is a
``DELETE ... RETURNING`` of the oldest unlocked row, one transaction each; a batch commit
deletes the oldest 1000 in one. Core pub/sub is ``LISTEN``/``NOTIFY``. Publishers and
consumers use separate connections, as they run at the same time in the latency workload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from .base import Core, Durable, OnPayload, System, Unreachable, fresh_name

_BATCH = 1000
_EMPTY_POLL_S = 0.001  # a consumer that found the table empty looks again after this


class _Table(Durable):
    def __init__(self, writer: Any, reader: Any, table: str) -> None:
        self.writer, self.reader = writer, reader
        self.insert = f"INSERT INTO {table} (payload) VALUES ($1)"
        self.take_one = (
            f"DELETE FROM {table} WHERE id = (SELECT id FROM {table} ORDER BY id "
            "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING payload"
        )
        self.take_batch = (
            f"WITH batch AS (SELECT id FROM {table} ORDER BY id FOR UPDATE SKIP LOCKED LIMIT {_BATCH}) "
            f"DELETE FROM {table} t USING batch WHERE t.id = batch.id RETURNING t.id, t.payload"
        )

    async def publish(self, payload: bytes) -> None:
        await self.writer.execute(self.insert, payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        async with self.writer.transaction():
            await self.writer.executemany(self.insert, [(p,) for p in payloads])

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        seen = 0
        while seen < count:
            payload = await self.reader.fetchval(self.take_one)
            if payload is None:
                await asyncio.sleep(_EMPTY_POLL_S)
                continue
            on_payload(payload)
            seen += 1

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        seen = 0
        while seen < count:
            rows = await self.reader.fetch(self.take_batch)
            if not rows:
                await asyncio.sleep(_EMPTY_POLL_S)
                continue
            for row in sorted(rows, key=lambda r: r["id"]):  # DELETE returns rows in no set order
                on_payload(row["payload"])
            seen += len(rows)


class _Notify(Core):
    def __init__(self, writer: Any, reader: Any, channel: str) -> None:
        self.writer, self.reader = writer, reader
        self.channel = channel
        self.callback: Callable[[Any, int, str, str], None] | None = None

    async def subscribe(self, on_payload: OnPayload) -> None:
        def notified(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
            on_payload(payload.encode())

        self.callback = notified
        await self.reader.add_listener(self.channel, notified)

    async def publish(self, payload: bytes) -> None:
        await self.writer.execute("SELECT pg_notify($1, $2)", self.channel, payload.decode())


class Postgres(System):
    name = "postgres"
    title = "PostgreSQL queue table, SKIP LOCKED (asyncpg)"
    kind = "networked"
    service_url = "postgresql://postgres@127.0.0.1:5432/test"
    unsupported = {
        "request_reply": "PostgreSQL has no request-reply",
        "backlog_memory": "the machine's shared PostgreSQL, not started by the harness: its peak "
        "RSS is not this backlog's alone",
    }

    async def open(self) -> None:
        try:
            self.writer = await asyncpg.connect(self.where.address, timeout=5)
            self.reader = await asyncpg.connect(self.where.address, timeout=5)
        except Exception as error:
            raise Unreachable(f"PostgreSQL at {self.where.address}: {error}") from error

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        table = fresh_name()
        await self.writer.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, payload bytea NOT NULL)")
        try:
            yield _Table(self.writer, self.reader, table)
        finally:
            await self.writer.execute(f"DROP TABLE {table}")

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        core = _Notify(self.writer, self.reader, fresh_name("core"))
        try:
            yield core
        finally:
            if core.callback is not None:
                await self.reader.remove_listener(core.channel, core.callback)
