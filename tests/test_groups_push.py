"""Push consumption of group members: `pigeon.engine.groups.push.consume`.

The handler runs with bounded concurrency (``max_outstanding`` messages, about
``max_outstanding_bytes`` of payload); a slow handler slows fetching; returning acks, raising
nacks (so redelivery, backoff and dead letters apply); ordered members handle each partition
in order and cancel the handler of a revoked partition. Real engine, nothing mocked.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import pytest

from pigeon.engine import Delivery, Engine, OrderedGroupConfig, SharedGroupConfig, StreamConfig
from pigeon.engine.groups.push import consume
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import InvalidConfigError
from pigeon.message import Headers

STREAM = "work"
SUBJECT = "work.item"


@pytest.fixture
async def engine(data_dir: Path):
    engine = await Engine.open(data_dir)
    try:
        yield engine
    finally:
        await engine.close()


async def make_stream(engine: Engine, partitions: int = 1) -> None:
    await engine.create_stream(StreamConfig(STREAM, (f"{STREAM}.>",), partitions=partitions))


async def publish(engine: Engine, n: int, *, size: int = 0, keyed: bool = False) -> None:
    for i in range(n):
        payload = str(i).encode().ljust(size, b".") if size else str(i).encode()
        await engine.publish(SUBJECT, payload, key=f"k{i}" if keyed else None)


def key_for(partition: int, partitions: int) -> str:
    for i in range(10_000):
        if partition_for_key(f"key-{i}".encode(), partitions) == partition:
            return f"key-{i}"
    raise AssertionError


def number(d: Delivery) -> int:
    return int(d.message.payload.rstrip(b"."))


async def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def dead_letters(engine: Engine, group: str):
    name = f"{STREAM}-{group}-dlq"
    return engine.fetch(name, 0, 0, 1000) if name in engine.streams() else []


def totals(engine: Engine, group: str) -> dict[str, int]:
    lags = engine.group_lag(STREAM, group)
    return {f: sum(getattr(x, f) for x in lags) for f in ("lag", "pending", "in_flight", "waiting")}


async def member_of(engine: Engine, kind: str, name: str = "g", **kw):
    if kind == "shared":
        kw.setdefault("ack_wait_s", 5)
        group = await engine.shared_group(STREAM, SharedGroupConfig(name, **kw))
        return group.member()
    kw.setdefault("session_timeout_s", 0.5)
    kw.setdefault("heartbeat_interval_s", 0.1)
    group = await engine.ordered_group(STREAM, OrderedGroupConfig(name, **kw))
    return await group.join()


class Running:
    """Counts handlers running at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


# -- bounded concurrency and back-pressure ------------------------------------------------------


async def test_concurrency_never_exceeds_max_outstanding(engine: Engine) -> None:
    await make_stream(engine, partitions=3)
    await publish(engine, 40, keyed=True)
    member = await member_of(engine, "shared")
    running = Running()
    handled: list[int] = []
    stop = asyncio.Event()
    rng = random.Random(3)

    async def handler(d: Delivery) -> None:
        running.enter()
        try:
            await asyncio.sleep(rng.random() * 0.02)
            handled.append(number(d))
        finally:
            running.leave()
        if len(handled) == 40:
            stop.set()

    await asyncio.wait_for(consume(member, handler, max_outstanding=4, stop=stop, poll_s=0.1), 10)
    assert sorted(handled) == list(range(40)), "every message handled exactly once"
    assert running.most <= 4
    assert running.most == 4, "the bound should actually be used (handlers run concurrently)"
    assert totals(engine, "g")["lag"] == 0


async def test_a_slow_handler_limits_fetching(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 10)
    member = await member_of(engine, "shared")
    release = asyncio.Event()
    started: list[int] = []
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        started.append(number(d))
        await release.wait()

    task = asyncio.ensure_future(consume(member, handler, max_outstanding=2, stop=stop, poll_s=0.1))
    await asyncio.sleep(0.3)
    assert len(started) == 2, "only max_outstanding messages may be taken while handlers are busy"
    t = totals(engine, "g")
    assert t["in_flight"] == 2 and t["pending"] == 8, "nothing beyond the budget is leased"
    release.set()
    await wait_for(lambda: totals(engine, "g")["lag"] == 0, what="all messages to be acked")
    stop.set()
    await asyncio.wait_for(task, 3)
    assert sorted(started) == list(range(10))


async def test_max_outstanding_bytes_limits_held_payload(engine: Engine) -> None:
    await make_stream(engine)
    size = 100
    await publish(engine, 20, size=size)
    member = await member_of(engine, "shared")
    release = asyncio.Event()
    started: list[int] = []
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        started.append(number(d))
        await release.wait()

    limit = 250
    task = asyncio.ensure_future(
        consume(member, handler, max_outstanding=100, max_outstanding_bytes=limit, stop=stop, poll_s=0.1)
    )
    try:
        await asyncio.sleep(0.3)
        held = totals(engine, "g")["in_flight"]
        # "About" the limit: at most one message beyond it (a message larger than the limit
        # must still be deliverable), never the whole message budget.
        assert len(started) * size <= limit + size, f"{len(started)} messages of {size} bytes held"
        assert held * size <= limit + size, f"{held} messages of {size} bytes leased"
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 3)


@pytest.mark.parametrize(
    "kwargs", [{"max_outstanding": 0}, {"max_outstanding": True}, {"max_outstanding_bytes": 0}]
)
async def test_invalid_consume_arguments_are_refused(engine: Engine, kwargs) -> None:
    await make_stream(engine)
    member = await member_of(engine, "shared")

    async def handler(d: Delivery) -> None:
        raise AssertionError("never called")

    with pytest.raises(InvalidConfigError):
        await consume(member, handler, **kwargs)


# -- outcomes of the handler ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_handler_exception_nacks_and_the_message_is_redelivered(engine: Engine, kind: str) -> None:
    await make_stream(engine)
    await publish(engine, 6)
    member = await member_of(engine, kind)
    attempts: dict[int, list[int]] = defaultdict(list)
    done: list[int] = []
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        n = number(d)
        attempts[n].append(d.delivery_count)
        if n % 2 and d.delivery_count == 1:
            raise RuntimeError(f"transient failure on {n}")
        done.append(n)
        if len(done) == 6:
            stop.set()

    await asyncio.wait_for(consume(member, handler, max_outstanding=3, stop=stop, poll_s=0.1), 10)
    assert sorted(done) == list(range(6))
    for n in (1, 3, 5):
        assert attempts[n] == [1, 2], f"message {n}: {attempts[n]}"
    assert totals(engine, "g")["lag"] == 0
    assert dead_letters(engine, "g") == []
    if kind == "ordered":
        assert done == list(range(6)), "an ordered partition is handled in offset order"


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_handler_failing_every_time_ends_in_the_dead_letters(engine: Engine, kind: str) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    member = await member_of(engine, kind, max_deliver=3)
    calls: dict[int, int] = defaultdict(int)
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        n = number(d)
        calls[n] += 1
        if n == 0:
            raise ValueError("always broken")

    task = asyncio.ensure_future(consume(member, handler, stop=stop, poll_s=0.1))
    await wait_for(
        lambda: bool(dead_letters(engine, "g")) and totals(engine, "g")["lag"] == 0, 2, "the dead letter"
    )
    stop.set()
    await asyncio.wait_for(task, 3)
    assert calls[0] == 3 and calls[1] == 1
    [dead] = dead_letters(engine, "g")
    assert dead.payload == b"0"
    assert dead.headers[Headers.ERROR_TYPE] == "ValueError"
    assert dead.headers[Headers.ERROR_MESSAGE] == "always broken"
    assert dead.headers[Headers.DELIVERY_COUNT] == "3"


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_a_handler_may_settle_the_delivery_itself(engine: Engine, kind: str, loop_errors) -> None:
    await make_stream(engine)
    await publish(engine, 4)
    member = await member_of(engine, kind)
    seen: list[int] = []
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        seen.append(number(d))
        if number(d) == 2:
            await d.term("not wanted")
        else:
            await d.ack()
        if len(seen) == 4:
            stop.set()

    await asyncio.wait_for(consume(member, handler, stop=stop, poll_s=0.1), 5)
    assert sorted(seen) == [0, 1, 2, 3]
    assert [m.payload for m in dead_letters(engine, "g")] == [b"2"]
    assert totals(engine, "g")["lag"] == 0
    assert loop_errors == []


async def test_stop_ends_fetching_and_waits_for_running_handlers(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    member = await member_of(engine, "shared")
    stop = asyncio.Event()
    finished = []

    async def handler(d: Delivery) -> None:
        stop.set()
        await asyncio.sleep(0.2)
        finished.append(number(d))

    t0 = time.monotonic()
    await asyncio.wait_for(consume(member, handler, stop=stop, poll_s=5), 3)
    assert finished == [0], "consume returns only after the running handler finished"
    assert time.monotonic() - t0 < 2, "stop must not wait for the poll to time out"
    assert totals(engine, "g")["lag"] == 0, "the finished handler's delivery was acked"
    await publish(engine, 1)
    await asyncio.sleep(0.1)
    assert totals(engine, "g")["pending"] == 1, "nothing is fetched after stop"


# -- ordered members ----------------------------------------------------------------------------


async def test_ordered_push_keeps_partition_order_and_runs_partitions_in_parallel(engine: Engine) -> None:
    partitions = 3
    await make_stream(engine, partitions=partitions)
    per_partition = 12
    for p in range(partitions):
        key = key_for(p, partitions)
        for i in range(per_partition):
            await engine.publish(SUBJECT, f"{p}:{i}".encode(), key=key)
    member = await member_of(engine, "ordered")
    running = Running()
    in_partition: dict[int, int] = defaultdict(int)
    order: dict[int, list[int]] = defaultdict(list)
    violations: list[str] = []
    stop = asyncio.Event()
    rng = random.Random(11)

    async def handler(d: Delivery) -> None:
        p = d.partition
        if in_partition[p]:
            violations.append(f"two handlers at once on partition {p}")
        in_partition[p] += 1
        running.enter()
        try:
            await asyncio.sleep(rng.random() * 0.01)
            if d.offset % 5 == 3 and d.delivery_count == 1:
                raise RuntimeError("fail once")
            order[p].append(d.offset)
        finally:
            running.leave()
            in_partition[p] -= 1
        if sum(map(len, order.values())) == partitions * per_partition:
            stop.set()

    await asyncio.wait_for(consume(member, handler, max_outstanding=10, stop=stop, poll_s=0.1), 10)
    assert violations == []
    for p in range(partitions):
        assert order[p] == list(range(per_partition)), f"partition {p}: {order[p]}"
    assert 2 <= running.most <= partitions, "partitions run in parallel, one handler each"


async def test_revoked_partition_cancels_its_running_handler(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    for p in range(2):
        await engine.publish(SUBJECT, f"p{p}".encode(), key=key_for(p, 2))
    group = await engine.ordered_group(
        STREAM, OrderedGroupConfig("g", session_timeout_s=0.5, heartbeat_interval_s=0.1)
    )
    a = await group.join("a")
    started: list[int] = []
    cancelled: list[int] = []
    completed: list[int] = []
    release = asyncio.Event()
    stop = asyncio.Event()

    async def slow(d: Delivery) -> None:
        started.append(d.partition)
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(d.partition)
            raise
        completed.append(d.partition)

    task = asyncio.ensure_future(consume(a, slow, stop=stop, poll_s=0.1))
    try:
        await wait_for(lambda: sorted(started) == [0, 1], what="both handlers to start")
        b = await group.join("b")
        [moved] = b.partitions
        await wait_for(lambda: cancelled == [moved], 2, "the revoked partition's handler to be cancelled")
        assert engine.group_lag(STREAM, "g")[moved].committed == 0, "a cancelled handler acked nothing"
        [d] = await b.fetch(10, 1)
        assert (d.partition, d.offset) == (moved, 0)
        await d.ack()
        assert engine.group_lag(STREAM, "g")[moved].committed == 1
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 3)
    assert completed == [1 - moved], "the handler of the partition that stayed was not disturbed"
    assert engine.group_lag(STREAM, "g")[1 - moved].committed == 1


# -- seed scenario: acknowledge only after the database commit -----------------------------------


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_ack_after_the_database_commit(engine: Engine, tmp_path: Path, kind: str) -> None:
    """Seed scenario: the handler writes a row and acks only after COMMIT; failing before the
    commit rolls back and the message is redelivered, so the table has every row exactly once."""
    await make_stream(engine, partitions=2)
    total = 30
    await publish(engine, total, keyed=True)
    member = await member_of(engine, kind)
    db = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    db.execute("CREATE TABLE processed (n INTEGER, attempt INTEGER)")
    failures = 0
    rng = random.Random(21)
    stop = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal failures
        await asyncio.sleep(rng.random() * 0.005)  # the "work" before writing
        db.execute("BEGIN")
        try:
            db.execute("INSERT INTO processed VALUES (?, ?)", (number(d), d.delivery_count))
            if d.delivery_count == 1 and rng.random() < 0.3:
                failures += 1
                raise ConnectionError("database went away before COMMIT")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        await d.ack()  # only after the commit
        if db.execute("SELECT COUNT(*) FROM processed").fetchone()[0] == total:
            stop.set()

    await asyncio.wait_for(consume(member, handler, max_outstanding=5, stop=stop, poll_s=0.1), 15)
    rows = db.execute("SELECT n, COUNT(*) FROM processed GROUP BY n ORDER BY n").fetchall()
    retried = db.execute("SELECT COUNT(*) FROM processed WHERE attempt > 1").fetchone()[0]
    db.close()
    assert rows == [(n, 1) for n in range(total)], "every row exactly once"
    assert failures > 0
    if kind == "shared":
        assert retried == failures, "each failure was redelivered and then committed"
    else:  # a rewind redelivers what followed the failure too, and counts those deliveries
        assert retried >= failures, "each failure was redelivered and then committed"
    assert totals(engine, "g")["lag"] == 0
    assert dead_letters(engine, "g") == []
