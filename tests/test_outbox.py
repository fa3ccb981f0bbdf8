"""The transactional outbox on real databases (SQLite, PostgreSQL, MariaDB) and real transports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from pigeon.errors import (
    EngineClosedError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidNameError,
    InvalidSubjectError,
    MessageTooLargeError,
)
from pigeon.message import Headers, Message
from pigeon.patterns.outbox import Outbox, OutboxRelay
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import ConsumerSpec, StreamSpec, Transport, connect
from pigeon.transport.embedded import EmbeddedOptions, EmbeddedTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
import outbox_relay_worker as worker

DATABASES = ["sqlite", "postgres", "mariadb"]


def database_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    if kind == "postgres":
        require_service("postgres")
        return "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    require_service("mariadb")
    return "mysql+aiomysql://root@127.0.0.1:3306/test"


@contextlib.asynccontextmanager
async def open_outbox(kind: str, tmp_path: Path) -> AsyncIterator[Outbox]:
    outbox = Outbox.from_url(database_url(kind, tmp_path), table=unique_name("outbox").replace("-", "_"))
    await outbox.create_table()
    try:
        yield outbox
    finally:
        await outbox.drop_table()
        await outbox.close()


@pytest.fixture(params=DATABASES)
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    async with open_outbox(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Transport]:
    """The embedded transport with a stream ``orders`` capturing ``orders.>``."""
    transport = await connect(f"file://{tmp_path / 'b'}")
    await transport.create_stream(StreamSpec("orders", ("orders.>",)))
    try:
        yield transport
    finally:
        await transport.close()


async def add_committed(outbox: Outbox, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Add the rows in one application transaction and commit it; their ids."""
    async with async_sessionmaker(outbox.engine)() as session, session.begin():
        return [await outbox.add(session, **row) for row in rows]


async def read_stream(transport: Transport, stream: str, expected: int) -> list[Message]:
    """Every stored message, in order (one partition), read by a fresh ordered group; waits
    for ``expected`` of them, then briefly for any more (a duplicate would show up here)."""
    consumer = await transport.consumer(stream, ConsumerSpec(unique_name("g"), kind="ordered"))
    got: list[Message] = []
    try:
        deadline = time.monotonic() + 15
        while len(got) < expected and time.monotonic() < deadline:
            for received in await consumer.fetch(100, timeout=1.0):
                got.append(received.message)
                await received.ack()
        for received in await consumer.fetch(100, timeout=0.3):
            got.append(received.message)
            await received.ack()
    finally:
        await consumer.close()
    return got


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return await check()


async def no_pending(outbox: Outbox) -> bool:
    return await outbox.pending() == 0


async def sent_flags(outbox: Outbox) -> list[bool]:
    """Per row, in seq order: whether it is marked sent."""
    table = outbox.table
    async with outbox.engine.connect() as conn:
        rows = await conn.execute(select(table.c.sent_at).order_by(table.c.seq))
        return [sent_at is not None for (sent_at,) in rows]


async def test_rollback_publishes_nothing_and_commit_publishes_in_seq_order(
    outbox: Outbox, broker: Transport
) -> None:
    relay = OutboxRelay(outbox, broker)
    with pytest.raises(RuntimeError, match="order rejected"):
        async with async_sessionmaker(outbox.engine)() as session, session.begin():
            await outbox.add(session, "orders.lost", b"rolled back")
            assert await outbox.pending() == 0  # not committed: another connection cannot see it
            raise RuntimeError("order rejected")  # the application's transaction rolls back
    assert await outbox.pending() == 0
    assert await relay.run_once() == 0

    rows = [
        {"subject": f"orders.created.{i}", "payload": f"order {i}".encode(), "key": f"k{i % 2}"}
        for i in range(5)
    ]
    rows[1]["headers"] = {"tenant": "acme", "ünï": "cödé"}
    rows[2]["msg_id"] = "explicit-Id"
    rows[3]["msg_id"] = "EXPLICIT-ID"  # differs only in case: a different message
    rows[4]["payload"] = os.urandom(100_000)  # beyond a MySQL BLOB
    ids = await add_committed(outbox, rows[:3])
    ids += await add_committed(outbox, rows[3:])
    assert ids[2:4] == ["explicit-Id", "EXPLICIT-ID"]
    assert len(set(ids)) == 5
    assert await outbox.pending() == 5
    assert await sent_flags(outbox) == [False] * 5

    assert await relay.run_once() == 5
    assert await outbox.pending() == 0
    assert await sent_flags(outbox) == [True] * 5
    assert await relay.run_once() == 0

    stored = await read_stream(broker, "orders", 5)
    assert [m.id for m in stored] == ids
    for message, row in zip(stored, rows, strict=True):
        assert message.subject == row["subject"]
        assert message.payload == row["payload"]
        assert message.key == row["key"]
        assert message.headers == row.get("headers", {})


async def test_a_batch_stops_at_batch_size_and_the_next_pass_continues(
    broker: Transport, tmp_path: Path
) -> None:
    async with open_outbox("sqlite", tmp_path) as outbox:
        ids = await add_committed(outbox, [{"subject": f"orders.n{i}"} for i in range(7)])
        relay = OutboxRelay(outbox, broker, batch_size=3)
        assert [await relay.run_once() for _ in range(4)] == [3, 3, 1, 0]
        assert [m.id for m in await read_stream(broker, "orders", 7)] == ids


async def test_add_refuses_what_the_relay_could_never_publish(tmp_path: Path) -> None:
    async with open_outbox("sqlite", tmp_path) as outbox:
        bad: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"subject": "orders.*"}, InvalidSubjectError),
            ({"subject": "orders..x"}, InvalidSubjectError),
            ({"subject": "orders.x", "payload": "text"}, InvalidMessageError),
            ({"subject": "orders.x", "key": 7}, InvalidMessageError),
            ({"subject": "orders.x", "key": "a\x00b"}, InvalidMessageError),
            ({"subject": "orders.x", "headers": {"n": 1}}, InvalidMessageError),
            ({"subject": "orders.x", "headers": {"": "v"}}, InvalidMessageError),
            ({"subject": "orders.x", "headers": ["n", "v"]}, InvalidMessageError),
            ({"subject": "orders.x", "msg_id": ""}, InvalidMessageError),
            ({"subject": "orders.x", "msg_id": "x" * 256}, InvalidMessageError),
            ({"subject": "orders.x", "msg_id": "\ud800"}, InvalidMessageError),
        ]
        for row, error in bad:
            with pytest.raises(error):
                await add_committed(outbox, [row])
        assert await outbox.pending() == 0
        await add_committed(outbox, [{"subject": "orders.x", "msg_id": "once"}])
        with pytest.raises(IntegrityError):
            await add_committed(outbox, [{"subject": "orders.y", "msg_id": "once"}])
        assert await outbox.pending() == 1


async def test_configuration_errors(tmp_path: Path, broker: Transport) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    for table in ("", "1abc", "bad-name", "a" * 51, 'x"; drop table y'):
        with pytest.raises(InvalidNameError):
            Outbox.from_url(url, table=table)
    outbox = Outbox.from_url(url)
    try:
        assert outbox.table.name == "pigeon_outbox"
        bad: list[dict[str, Any]] = [
            {"batch_size": 0},
            {"batch_size": True},
            {"poll_interval_s": 0},
            {"max_backoff_s": -1},
        ]
        for kwargs in bad:
            with pytest.raises(InvalidConfigError):
                OutboxRelay(outbox, broker, **kwargs)
        with pytest.raises(InvalidConfigError):
            await outbox.purge_sent(-1)
        await outbox.create_table()
        await outbox.create_table()  # idempotent
        assert await outbox.pending() == 0
    finally:
        await outbox.close()


@pytest.mark.parametrize("kind", DATABASES)
async def test_two_relays_publish_every_row_exactly_once(kind: str, tmp_path: Path) -> None:
    """Two relays race over 200 rows the application commits meanwhile. The stream keeps no
    dedup window, so a row published twice would be stored twice."""
    async with open_outbox(kind, tmp_path) as outbox:
        transport = await connect(f"file://{tmp_path / 'b'}")
        try:
            await transport.create_stream(StreamSpec("orders", ("orders.>",), dedup_window_s=0))
            relays = [OutboxRelay(outbox, transport, batch_size=7, poll_interval_s=0.01) for _ in range(2)]
            stop = asyncio.Event()
            tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
            ids: list[str] = []
            for t in range(20):
                ids += await add_committed(outbox, [{"subject": f"orders.t{t}.{i}"} for i in range(10)])
                await asyncio.sleep(0.005)
            assert await eventually(lambda: no_pending(outbox), 20)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert await outbox.pending() == 0
            assert await sent_flags(outbox) == [True] * 200
            assert (await transport.stream_state("orders")).messages == 200
            stored = await read_stream(transport, "orders", 200)
            assert sorted(m.id for m in stored) == sorted(ids)
        finally:
            await transport.close()


async def test_a_failed_publish_leaves_its_row_and_the_later_ones_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row too large for the transport stops the batch there: the rows before it are sent,
    it and the rows after it stay pending (never skipped) until a transport takes it."""
    folder = f"file://{tmp_path / 'b'}"
    async with open_outbox("sqlite", tmp_path) as outbox:
        payloads = [b"a", b"b", b"c", b"x" * 5000, b"d", b"e"]
        ids = await add_committed(outbox, [{"subject": "orders.p", "payload": p} for p in payloads])
        small = await connect(folder, EmbeddedOptions(max_message_bytes=4096))
        try:
            await small.create_stream(StreamSpec("orders", ("orders.>",)))
            relay = OutboxRelay(outbox, small, poll_interval_s=0.01, max_backoff_s=0.02)
            with pytest.raises(MessageTooLargeError) as failure:
                await relay.run_once()
            assert f"msg_id={ids[3]}" in "".join(getattr(failure.value, "__notes__", []))
            assert await sent_flags(outbox) == [True, True, True, False, False, False]
            # run() keeps retrying the same row, with backoff, and publishes nothing after it.
            stop = asyncio.Event()
            with caplog.at_level(logging.WARNING, logger="pigeon.outbox"):
                task = asyncio.create_task(relay.run(stop))
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.wait_for(task, 5)
            retries = [r for r in caplog.records if r.name == "pigeon.outbox"]
            assert len(retries) >= 3
            assert isinstance(retries[0].exc_info and retries[0].exc_info[1], MessageTooLargeError)
            assert await outbox.pending() == 3
            assert (await small.stream_state("orders")).messages == 3
        finally:
            await small.close()

        closed = await connect(folder)
        await closed.close()
        with pytest.raises(EngineClosedError):
            await OutboxRelay(outbox, closed).run_once()
        assert await outbox.pending() == 3

        large = await connect(folder)
        try:
            assert await OutboxRelay(outbox, large).run_once() == 3
            assert await outbox.pending() == 0
            assert [m.payload for m in await read_stream(large, "orders", 6)] == payloads
        finally:
            await large.close()


async def test_a_subject_no_stream_captures_is_published_to_core_subscribers_and_marked_sent(
    outbox: Outbox, broker: Transport
) -> None:
    subscription = await broker.subscribe("news.>")
    try:
        (msg_id,) = await add_committed(outbox, [{"subject": "news.today", "payload": b"hi"}])
        assert await OutboxRelay(outbox, broker).run_once() == 1
        message = await subscription.next(timeout=2)
        assert (message.subject, message.payload, message.id) == ("news.today", b"hi", msg_id)
        assert await outbox.pending() == 0
    finally:
        await subscription.unsubscribe()


async def test_purge_sent_removes_only_sent_rows_older_than_the_limit(
    outbox: Outbox, broker: Transport
) -> None:
    relay = OutboxRelay(outbox, broker)
    await add_committed(outbox, [{"subject": f"orders.old{i}"} for i in range(3)])
    assert await relay.run_once() == 3
    await asyncio.sleep(0.6)
    await add_committed(outbox, [{"subject": f"orders.new{i}"} for i in range(2)])
    assert await relay.run_once() == 2
    await add_committed(outbox, [{"subject": "orders.pending"}])

    assert await outbox.purge_sent(3600) == 0
    assert await outbox.purge_sent(0.3) == 3
    assert await sent_flags(outbox) == [True, True, False]
    assert await outbox.purge_sent(0) == 2
    assert await sent_flags(outbox) == [False]
    assert await outbox.pending() == 1


async def test_relay_over_every_transport(any_transport: Transport, make_stream: Any, tmp_path: Path) -> None:
    stream, prefix = await make_stream(partitions=1)
    async with open_outbox("sqlite", tmp_path) as outbox:
        rows = [
            {
                "subject": f"{prefix}.e{i}",
                "payload": f"event {i}".encode(),
                "key": f"key-{i % 3}",
                "headers": {"n": str(i)},
            }
            for i in range(30)
        ]
        ids = await add_committed(outbox, rows)
        assert await OutboxRelay(outbox, any_transport, batch_size=8).run_once() == 8
        assert await OutboxRelay(outbox, any_transport).run_once() == 22
        assert await outbox.pending() == 0
        stored = await read_stream(any_transport, stream, 30)
        # In seq order, each once; where the engine cannot take a publisher's id (RabbitMQ),
        # the id travels as the original id that idempotent consumers key on.
        assert [m.headers.get(Headers.ORIGINAL_MSG_ID, m.id) for m in stored] == ids
        assert [m.payload for m in stored] == [r["payload"] for r in rows]
        assert [m.key for m in stored] == [r["key"] for r in rows]
        assert [m.headers.get("n") for m in stored] == [r["headers"]["n"] for r in rows]


# -- crash test ----------------------------------------------------------------------------------

CRASH_CYCLES = int(os.environ.get("PIGEON_OUTBOX_CRASH_CYCLES", "8"))
CRASH_SEED = int(os.environ.get("PIGEON_OUTBOX_CRASH_SEED", "20250614"))


async def _stored_ids(folder: Path) -> list[str]:
    """The message ids in the worker's stream, in offset order (the worker is dead)."""
    transport = await connect(f"file://{folder}")
    assert isinstance(transport, EmbeddedTransport)
    try:
        if worker.STREAM not in transport.engine.streams():
            return []
        return [m.id async for m in transport.engine.read(worker.STREAM, 0)]
    finally:
        await transport.close()


async def _kill_cycle(
    cycle: int, outbox: Outbox, url: str, folder: Path, rnd: random.Random, work: Path
) -> None:
    """Start a relay worker, keep committing rows while it runs, SIGKILL it at a random moment."""
    out_path, err_path = work / f"out-{cycle}.txt", work / f"err-{cycle}.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(worker.__file__)), url, outbox.table.name, str(folder),
            "--max-seconds", "30", stdout=out, stderr=err, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    try:
        if rnd.random() < 0.8:  # otherwise killed while it may still be starting up

            async def ready() -> bool:
                return out_path.stat().st_size >= 6 or proc.returncode is not None

            assert await eventually(ready, 20, interval=0.005), f"cycle {cycle}: worker never ready"
        kill_at = time.monotonic() + rnd.uniform(0.02, 0.4)
        n = 0
        while time.monotonic() < kill_at:
            await add_committed(outbox, [{"subject": f"outbox.c{cycle}.{n + i}"} for i in range(10)])
            n += 10
            await asyncio.sleep(0.01)
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        status = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert status == -signal.SIGKILL, f"cycle {cycle}: worker exited: {err_path.read_text()[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_relay_killed_at_random_moments_loses_nothing_and_dedup_stores_each_once(
    kind: str, tmp_path: Path
) -> None:
    rnd = random.Random(CRASH_SEED)
    folder = tmp_path / "broker"
    url = database_url(kind, tmp_path)
    in_flight = 0  # rows the broker stored whose mark the kill prevented: republished later
    async with open_outbox(kind, tmp_path) as outbox:
        await add_committed(outbox, [{"subject": f"outbox.first.{i}"} for i in range(200)])
        for cycle in range(CRASH_CYCLES):
            await _kill_cycle(cycle, outbox, url, folder, rnd, tmp_path)
            stored = set(await _stored_ids(folder))
            table = outbox.table
            async with outbox.engine.connect() as conn:
                rows = (await conn.execute(select(table.c.msg_id, table.c.sent_at))).all()
            marked_not_stored = [mid for mid, sent_at in rows if sent_at is not None and mid not in stored]
            assert not marked_not_stored, f"seed {CRASH_SEED} cycle {cycle}: marked sent, never stored"
            in_flight += sum(1 for mid, sent_at in rows if sent_at is None and mid in stored)

        drain = await connect(f"file://{folder}", EmbeddedOptions(durability="always"))
        try:
            relay = OutboxRelay(outbox, drain)
            while await relay.run_once():
                pass
        finally:
            await drain.close()
        assert await outbox.pending() == 0
        table = outbox.table
        async with outbox.engine.connect() as conn:
            ids = list((await conn.execute(select(table.c.msg_id).order_by(table.c.seq))).scalars())
            assert (await conn.execute(select(func.count()).select_from(table))).scalar_one() == len(ids)
        stored_ids = await _stored_ids(folder)
        twice = [mid for mid, count in Counter(stored_ids).items() if count > 1]
        assert not twice, f"seed {CRASH_SEED}: stored more than once: {twice[:5]}"
        # One relay at a time and the duplicates dropped: the stream is the outbox in seq order.
        assert stored_ids == ids, f"seed {CRASH_SEED}: stream differs from the outbox"
        assert in_flight > 0, f"seed {CRASH_SEED}: no kill landed between a publish and its mark"
        print(f"outbox crash test ({kind}, seed {CRASH_SEED}): {len(ids)} rows, {in_flight} republished")
