"""The PostgreSQL transport beyond the conformance suite: commit-order offsets (a late commit
is never skipped), dedup, retention, leases, ordered groups' assignment and failures, core
messaging across transports, and the refusals.

Every test works in a schema of its own (dropped at the end), so runs in parallel never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from pigeon.engine.config import StartAt
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import (
    AlreadySettledError,
    DeliveryNotOwnedError,
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidNameError,
    MessageTooLargeError,
    RequestTimeoutError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
)
from pigeon.message import Headers, Message
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec
from pigeon.transport.postgres import PostgresOptions, PostgresTransport
from pigeon.transport.postgres._streams import read


def fast(schema: str, **overrides: Any) -> PostgresOptions:
    settings: dict[str, Any] = {
        "schema": schema,
        "poll_interval_s": 0.2,
        "session_timeout_s": 1.0,
        "heartbeat_interval_s": 0.2,
        "maintenance_interval_s": 60.0,  # tests call maintain() when they mean it
        "pool_size": 5,
    }
    settings.update(overrides)
    return PostgresOptions(**settings)


@pytest.fixture
async def url() -> str:
    return require_service("postgres")


@pytest.fixture
async def schema(url: str) -> AsyncIterator[str]:
    """A schema of the test's own, dropped afterwards (with every table in it)."""
    name = f"pigeon_t_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


class Env:
    def __init__(self, transport: PostgresTransport, url: str, schema: str) -> None:
        self.t = transport
        self.url = url
        self.schema = schema
        self.others: list[PostgresTransport] = []

    async def stream(self, partitions: int = 1, **limits: Any) -> tuple[str, str]:
        name = unique_name("ps")
        prefix = name.replace("-", "_")
        await self.t.create_stream(StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits))
        return name, prefix

    async def another(self, **overrides: Any) -> PostgresTransport:
        """A second transport on the same schema (as another process would have)."""
        transport = await connect(self.url, fast(self.schema, **overrides))
        assert isinstance(transport, PostgresTransport)
        self.others.append(transport)
        return transport


@pytest.fixture
async def env(url: str, schema: str) -> AsyncIterator[Env]:
    transport = await connect(url, fast(schema))
    assert isinstance(transport, PostgresTransport)
    env = Env(transport, url, schema)
    try:
        yield env
    finally:
        for other in env.others:
            await other.close()
        await transport.close()


async def drain(consumer: Any, expected: int, timeout: float = 10.0, ack: bool = True) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        for received in await consumer.fetch(expected - len(got), 0.5):
            got.append(received)
            if ack:
                await received.ack()
    return got


# -- basics --------------------------------------------------------------------------------------


def test_options_are_checked() -> None:
    with pytest.raises(InvalidConfigError):
        PostgresOptions(schema="Has-Caps")
    with pytest.raises(InvalidConfigError):
        PostgresOptions(schema="x" * 49)
    with pytest.raises(InvalidConfigError):
        PostgresOptions(pool_size=0)
    with pytest.raises(InvalidConfigError):
        PostgresOptions(pool_size=2, pool_min_size=3)
    with pytest.raises(InvalidConfigError):
        PostgresOptions(session_timeout_s=1.0, heartbeat_interval_s=0.8)
    with pytest.raises(InvalidConfigError):
        PostgresOptions(poll_interval_s=0)


async def test_both_schemes_open_it_and_bad_input_is_refused(url: str, schema: str) -> None:
    for scheme_url in (url, url.replace("postgresql://", "postgres://", 1)):
        transport = await connect(scheme_url, fast(schema))
        assert isinstance(transport, PostgresTransport)
        await transport.close()
    with pytest.raises(InvalidConfigError):
        await connect(url, object())
    with pytest.raises(TransportClosedError):
        await connect("postgresql://postgres@127.0.0.1:1/test", fast(schema, connect_timeout_s=1.0))
    with pytest.raises(InvalidConfigError):
        await connect(url.rsplit("/", 1)[0] + "/no_such_database_here", fast(schema))


async def test_closed_transport_refuses_work(url: str, schema: str) -> None:
    transport = await connect(url, fast(schema))
    await transport.close()
    await transport.close()  # twice is fine
    with pytest.raises(TransportClosedError):
        await transport.publish("x.y", b"")
    with pytest.raises(TransportClosedError):
        await transport.subscribe("x.y")
    with pytest.raises(TransportClosedError):
        await transport.create_stream(StreamSpec("s", ("x.>",)))


async def test_bad_messages_raise_pigeon_errors(env: Env) -> None:
    _, prefix = await env.stream()
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", headers={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", key="nul\x00inside")
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", headers={"h": "\ud800"})
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", msg_id="")
    with pytest.raises(MessageTooLargeError):
        await env.t.publish(f"{prefix}.x", b"x" * (env.t.options.max_message_bytes + 1))


async def test_schemas_do_not_see_each_other(env: Env, url: str) -> None:
    stream, _ = await env.stream()
    other_schema = f"pigeon_t_{uuid.uuid4().hex[:12]}"
    other = await connect(url, fast(other_schema))
    try:
        with pytest.raises(StreamNotFoundError):
            await other.stream_state(stream)
    finally:
        await other.close()
        conn = await asyncpg.connect(url)
        await conn.execute(f'DROP SCHEMA "{other_schema}" CASCADE')
        await conn.close()


# -- offsets in commit order ---------------------------------------------------------------------


async def test_a_message_committed_late_is_never_skipped(env: Env) -> None:
    """Writer A takes an offset and holds its transaction open; writer B writes to the same
    partition and commits; a reader reads; then A commits. The reader must see A's message
    before B's: B waits for A's counter-row lock, so it cannot commit first."""
    stream, prefix = await env.stream()
    shared = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    ordered = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    conn_a = await asyncpg.connect(env.url)
    try:
        tx = conn_a.transaction()
        await tx.start()
        ack_a = await env.t.publish_in(conn_a, f"{prefix}.a", b"A")
        assert ack_a is not None and ack_a.offset == 0
        writer_b = asyncio.create_task(env.t.publish(f"{prefix}.b", b"B"))
        await asyncio.sleep(0.3)
        assert not writer_b.done(), "B committed while A, holding an earlier offset, was still open"
        assert await shared.fetch(10, 0.3) == []
        assert await ordered.fetch(10, 0.3) == []
        async with env.t.pool.acquire() as raw:  # a plain "offset >= next" reader sees nothing yet
            assert await read(raw, env.t.names, stream, 0, 0, 10) == []
        await tx.commit()
        ack_b = await writer_b
        assert ack_b is not None and ack_b.offset == 1
    finally:
        await conn_a.close()
    for consumer in (shared, ordered):
        got = await drain(consumer, 2)
        assert [(r.offset, r.message.payload) for r in got] == [(0, b"A"), (1, b"B")]
        await consumer.close()


async def test_a_rolled_back_publish_leaves_no_gap(env: Env) -> None:
    stream, prefix = await env.stream()
    conn = await asyncpg.connect(env.url)
    try:
        tx = conn.transaction()
        await tx.start()
        assert (await env.t.publish_in(conn, f"{prefix}.x", b"never")).offset == 0  # type: ignore[union-attr]
        await tx.rollback()
    finally:
        await conn.close()
    ack = await env.t.publish(f"{prefix}.x", b"kept")
    assert ack is not None and ack.offset == 0
    assert (await env.t.stream_state(stream)).messages == 1


async def test_out_of_order_commits_never_make_a_tailing_reader_skip(env: Env) -> None:
    """Many writers hold their transactions open for random times while a reader tails the
    partition with "next offset to read": it must see every offset, in order, without a gap."""
    stream, prefix = await env.stream()
    writers, per_writer = 6, 15
    total = writers * per_writer
    seen: list[int] = []

    async def writer(n: int) -> None:
        conn = await asyncpg.connect(env.url)
        try:
            for i in range(per_writer):
                async with conn.transaction():
                    await env.t.publish_in(conn, f"{prefix}.w{n}", f"{n}:{i}".encode())
                    await asyncio.sleep(random.uniform(0, 0.01))
        finally:
            await conn.close()

    async def reader() -> None:
        deadline = time.monotonic() + 30
        async with env.t.pool.acquire() as conn:
            while len(seen) < total and time.monotonic() < deadline:
                for message in await read(conn, env.t.names, stream, 0, len(seen), 100):
                    assert message.offset == len(seen), f"skipped from {len(seen)} to {message.offset}"
                    seen.append(message.offset)
                await asyncio.sleep(0.001)

    await asyncio.gather(reader(), *(writer(n) for n in range(writers)))
    assert seen == list(range(total))


async def test_offsets_are_dense_and_keys_route_like_the_engine(env: Env) -> None:
    stream, prefix = await env.stream(partitions=3)
    acks = [await env.t.publish(f"{prefix}.k", b"", key=f"key{i}") for i in range(30)]
    by_partition: dict[int, list[int]] = {}
    for i, ack in enumerate(acks):
        assert ack is not None
        assert ack.partition == partition_for_key(f"key{i}".encode(), 3)
        by_partition.setdefault(ack.partition, []).append(ack.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    unkeyed = [await env.t.publish(f"{prefix}.u", b"") for _ in range(30)]
    counts = [sum(1 for a in unkeyed if a and a.partition == p) for p in range(3)]
    assert counts == [10, 10, 10], "unkeyed messages spread evenly"
    state = await env.t.stream_state(stream)
    assert state.messages == 60
    assert sum(o + 1 for o in state.last_offsets) == 60


async def test_stored_messages_keep_every_field(env: Env) -> None:
    stream, prefix = await env.stream()
    before = time.time()
    await env.t.publish(f"{prefix}.x", bytes(range(256)), key="k", headers={"a": "1", "e": ""}, msg_id="m-1")
    await env.t.publish(f"{prefix}.x", b"")
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    first, second = await drain(consumer, 2)
    m = first.message
    assert (m.subject, m.payload, m.key, m.headers, m.id) == (
        f"{prefix}.x",
        bytes(range(256)),
        "k",
        {"a": "1", "e": ""},
        "m-1",
    )
    assert m.has_explicit_id and not second.message.has_explicit_id
    assert (m.stream, m.partition, m.offset) == (stream, 0, 0)
    assert before - 1 <= m.timestamp <= time.time() + 1
    again = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    assert [r.message.id for r in await drain(again, 2)] == [m.id, second.message.id], "ids are stable"


async def test_publish_batch_is_atomic_ordered_and_dedups(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    batch = [Message(f"{prefix}.x", str(i).encode(), key=f"k{i % 4}") for i in range(20)]
    batch.append(Message(f"{prefix}.x", b"dup", id="same"))
    batch.append(Message(f"{prefix}.x", b"dup", id="same"))
    batch.append(Message("nobody.captures.this", b"core only"))
    acks = await env.t.publish_batch(batch)
    assert acks[-1] is None
    first, second = acks[-3], acks[-2]
    assert first is not None and second is not None
    assert (
        not first.duplicate
        and second.duplicate
        and (second.partition, second.offset) == (first.partition, first.offset)
    )
    for p in range(2):
        offsets = [a.offset for a in acks[:20] if a and a.partition == p]
        assert offsets == sorted(offsets)
    assert (await env.t.stream_state(stream)).messages == 21


# -- dedup ------------------------------------------------------------------------------------------


async def test_dedup_window_and_concurrent_duplicates(env: Env) -> None:
    stream, prefix = await env.stream(partitions=3, dedup_window_s=0.5)
    results = await asyncio.gather(
        *(env.t.publish(f"{prefix}.x", b"once", msg_id="order-7") for _ in range(8))
    )
    originals = [a for a in results if a is not None and not a.duplicate]
    assert len(originals) == 1
    assert {(a.partition, a.offset) for a in results if a is not None} == {
        (originals[0].partition, originals[0].offset)
    }
    await asyncio.sleep(0.7)
    later = await env.t.publish(f"{prefix}.x", b"again", msg_id="order-7")
    assert later is not None and not later.duplicate, "the window passed"
    assert (await env.t.stream_state(stream)).messages == 2


async def test_duplicates_do_not_reach_core_subscribers(env: Env) -> None:
    _, prefix = await env.stream()
    watcher = await env.t.subscribe(f"{prefix}.>")
    await env.t.publish(f"{prefix}.x", b"1", msg_id="a")
    await env.t.publish(f"{prefix}.x", b"2", msg_id="a")
    assert (await watcher.next(5)).payload == b"1"
    with pytest.raises(TimeoutError):
        await watcher.next(0.3)


# -- the stream registry ----------------------------------------------------------------------------


async def test_stream_lifecycle_errors(env: Env) -> None:
    stream, prefix = await env.stream()
    await env.t.create_stream(StreamSpec(stream, (f"{prefix}.>",)))  # same: a no-op
    with pytest.raises(StreamExistsError):
        await env.t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=2))
    with pytest.raises(SubjectOverlapError):
        await env.t.create_stream(StreamSpec(unique_name("ps"), (f"{prefix}.x.*",)))
    with pytest.raises(InvalidConfigError):
        await env.t.create_stream(StreamSpec(unique_name("ps"), ("z.>",), max_msgs=0))
    with pytest.raises(StreamNotFoundError):
        await env.t.delete_stream(unique_name("missing"))
    with pytest.raises(StreamNotFoundError):
        await env.t.stream_state(unique_name("missing"))
    with pytest.raises(StreamNotFoundError):
        await env.t.consumer(unique_name("missing"), ConsumerSpec("g"))


async def test_another_transport_stores_in_a_stream_created_a_moment_ago(env: Env) -> None:
    other = await env.another()
    for _ in range(5):
        stream, prefix = await env.stream()
        # No waiting for the other transport's notification: its stale routing is caught.
        ack = await other.publish(f"{prefix}.x", b"stored")
        assert ack is not None and ack.stream == stream
        await env.t.delete_stream(stream)
        assert await other.publish(f"{prefix}.x", b"gone") is None


async def test_delete_stream_removes_its_rows_groups_and_dead_letter_streams(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec("g1", max_deliver=1))
    await env.t.publish(f"{prefix}.x", b"x", msg_id="id-1")
    (received,) = await drain(consumer, 1, ack=False)
    await received.term("bad")
    await consumer.close()
    assert f"{stream}-g1-dlq" in env.t.registry.streams
    await env.t.delete_stream(stream)
    async with env.t.pool.acquire() as conn:
        for table in ("messages", "partitions", "dedup", "groups", "cursors", "deliveries", "streams"):
            column = "name" if table == "streams" else "stream"
            count = await conn.fetchval(
                f'SELECT count(*) FROM "{env.schema}".{table} WHERE {column} LIKE $1', f"{stream}%"
            )
            assert count == 0, table


# -- retention -----------------------------------------------------------------------------------


async def test_retention_by_count_age_and_bytes(env: Env) -> None:
    by_count, p1 = await env.stream(partitions=2, max_msgs=10)
    for i in range(30):
        await env.t.publish(f"{p1}.x", b"", key=f"k{i}")
    state = await env.t.stream_state(by_count)
    assert state.messages <= 10 and sum(o + 1 for o in state.last_offsets) == 30
    by_age, p2 = await env.stream(max_age_s=0.5)
    for _ in range(5):
        await env.t.publish(f"{p2}.x", b"old")
    await asyncio.sleep(0.7)
    await env.t.publish(f"{p2}.x", b"new")
    assert (await env.t.stream_state(by_age)).messages == 1
    by_bytes, p3 = await env.stream(max_bytes=1000)
    for _ in range(10):
        await env.t.publish(f"{p3}.x", b"x" * 300)
    assert (await env.t.stream_state(by_bytes)).messages == 3
    consumer = await env.t.consumer(by_bytes, ConsumerSpec(unique_name("g")))
    assert [r.offset for r in await drain(consumer, 3)] == [7, 8, 9]
    await env.t.maintain()  # the periodic pass does the same


# -- shared groups ----------------------------------------------------------------------------------


async def test_group_specs_must_match(env: Env) -> None:
    stream, _ = await env.stream()
    await env.t.consumer(stream, ConsumerSpec("g", ack_wait_s=5))
    with pytest.raises(GroupExistsError):
        await env.t.consumer(stream, ConsumerSpec("g", ack_wait_s=6))
    with pytest.raises(GroupExistsError):
        await env.t.consumer(stream, ConsumerSpec("g", kind="ordered", ack_wait_s=5))
    with pytest.raises(GroupNotFoundError):
        await env.t.lag(stream, "nope")
    with pytest.raises(InvalidNameError):
        await env.t.consumer(stream, ConsumerSpec("g" * 60))  # its dead-letter stream's name


async def test_a_lost_lease_cannot_be_settled_and_settling_twice_fails(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.3)
    first, second = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (lost,) = await first.fetch(1, 5)
    await asyncio.sleep(0.4)
    (taken,) = await second.fetch(1, 5)
    assert taken.delivery_count == 2
    with pytest.raises(DeliveryNotOwnedError):
        await lost.ack()
    await taken.ack()
    with pytest.raises(AlreadySettledError):
        await taken.ack()


async def test_in_progress_keeps_the_lease(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.5)
    first, second = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (held,) = await first.fetch(1, 5)
    for _ in range(4):
        await asyncio.sleep(0.25)
        await held.in_progress()
    assert await second.fetch(1, 0.2) == []
    await held.ack()


async def test_max_ack_pending_bounds_unsettled_messages(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    spec = ConsumerSpec(unique_name("g"), max_ack_pending=5)
    consumers = [await env.t.consumer(stream, spec) for _ in range(3)]
    for i in range(20):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    held = [r for c in consumers for r in await c.fetch(10, 0.5)]
    assert len(held) == 5
    await held[0].ack()
    assert len(await consumers[0].fetch(10, 2)) == 1
    lag = await env.t.lag(stream, spec.group)
    assert sum(p.in_flight for p in lag) == 5 and sum(p.pending for p in lag) == 14


async def test_competing_members_never_share_a_message(env: Env, url: str) -> None:
    stream, prefix = await env.stream(partitions=3)
    other = await env.another()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=30)
    consumers = [await t.consumer(stream, spec) for t in (env.t, env.t, other, other)]
    await env.t.publish_batch([Message(f"{prefix}.x", str(i).encode(), key=str(i)) for i in range(300)])
    got: list[list[bytes]] = [[] for _ in consumers]

    async def work(i: int) -> None:
        while sum(map(len, got)) < 300:
            for r in await consumers[i].fetch(7, 0.3):
                got[i].append(r.message.payload)
                await r.ack()

    await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(4))), 30)
    everything = [p for g in got for p in g]
    assert sorted(everything) == sorted(str(i).encode() for i in range(300))
    assert sum(1 for g in got if g) >= 3


async def test_key_ordered_shared_groups_keep_each_key_in_order(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    spec = ConsumerSpec(unique_name("k"), key_ordered=True, ack_wait_s=10)
    consumers = [await env.t.consumer(stream, spec) for _ in range(3)]
    keys = [f"key{k}" for k in range(5)]
    for i in range(10):
        for key in keys:
            await env.t.publish(f"{prefix}.e", f"{key}:{i}".encode(), key=key)
    seen: dict[str, list[int]] = {key: [] for key in keys}
    in_flight: set[str] = set()
    failed: set[str] = set()

    async def work(consumer: Any) -> None:
        deadline = time.monotonic() + 20
        while sum(map(len, seen.values())) < 50 and time.monotonic() < deadline:
            for received in await consumer.fetch(4, 0.3):
                key, i = received.message.payload.decode().split(":")
                assert key not in in_flight, f"{key} delivered twice at once"
                in_flight.add(key)
                seen[key].append(int(i))
                await asyncio.sleep(0.002)
                in_flight.discard(key)
                if int(i) == 3 and key not in failed:
                    failed.add(key)
                    await received.nack()  # a failure keeps the key's order too
                    seen[key].pop()
                else:
                    await received.ack()

    await asyncio.gather(*(work(c) for c in consumers))
    for key in keys:
        assert seen[key] == list(range(10)), f"{key}: {seen[key]}"


async def test_delayed_nack_backoff_and_lag_while_waiting(env: Env) -> None:
    from pigeon.engine.groups.config import Backoff

    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), backoff=Backoff(delays_s=(0.5,)))
    first, second = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (received,) = await first.fetch(1, 5)
    await received.nack(error="flaky")  # the backoff's 0.5s
    nacked = time.monotonic()
    lag = await env.t.lag(stream, spec.group)
    assert (lag[0].waiting, lag[0].in_flight, lag[0].pending, lag[0].lag) == (1, 0, 0, 1)
    assert await second.fetch(1, 0.3) == []
    (again,) = await second.fetch(1, 5)
    assert time.monotonic() - nacked >= 0.45 and again.delivery_count == 2
    await again.ack()
    assert (await env.t.lag(stream, spec.group))[0].lag == 0


async def test_term_and_expired_last_delivery_go_to_dead_letters(env: Env) -> None:
    stream, prefix = await env.stream()
    group = unique_name("g")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=0.3, max_deliver=2))
    await env.t.publish(f"{prefix}.t", b"terminated", headers={"h": "1"})
    await env.t.publish(f"{prefix}.e", b"expired")
    first = await consumer.fetch(2, 5)
    await first[0].term(ValueError("no good"))
    await asyncio.sleep(0.4)  # the second one's lease expires
    (again,) = await consumer.fetch(2, 5)
    assert again.delivery_count == 2
    await asyncio.sleep(0.4)  # and expires again: its last allowed delivery
    assert await consumer.fetch(2, 0.5) == []
    letters = await env.t.read_dead_letters(stream, group)
    assert [m.payload for m in letters] == [b"terminated", b"expired"]
    assert letters[0].headers[Headers.ERROR_TYPE] == "ValueError"
    assert letters[0].headers["h"] == "1"
    assert letters[0].headers[Headers.DELIVERY_COUNT] == "1"
    assert "ack_wait" in letters[1].headers[Headers.ERROR_MESSAGE]
    assert letters[1].headers[Headers.DELIVERY_COUNT] == "2"
    assert letters[1].headers[Headers.ORIGINAL_OFFSET] == "1"
    assert (await env.t.lag(stream, group))[0].lag == 0


async def test_a_closed_member_hands_its_messages_back(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=30)
    first, second = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (held,) = await first.fetch(1, 5)
    await first.close()
    (again,) = await second.fetch(1, 2)
    assert again.delivery_count == 2
    with pytest.raises(DeliveryNotOwnedError):
        await held.ack()
    await again.ack()


async def test_start_at_latest_offset_and_time(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    for i in range(6):
        await env.t.publish(f"{prefix}.x", str(i).encode(), key="same")
    await asyncio.sleep(0.05)
    boundary = time.time()
    await asyncio.sleep(0.05)
    latest = await env.t.consumer(stream, ConsumerSpec(unique_name("l"), start=StartAt.latest()))
    at_offset = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), start=StartAt.offset(4)))
    for i in range(6, 9):
        await env.t.publish(f"{prefix}.x", str(i).encode(), key="same")
    at_time = await env.t.consumer(stream, ConsumerSpec(unique_name("t"), start=StartAt.time(boundary)))
    assert [int(r.message.payload) for r in await drain(latest, 3)] == [6, 7, 8]
    assert [int(r.message.payload) for r in await drain(at_offset, 5)] == [4, 5, 6, 7, 8]
    assert [int(r.message.payload) for r in await drain(at_time, 3)] == [6, 7, 8]


async def test_delete_group(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec("g"))
    await env.t.publish(f"{prefix}.x", b"x")
    await drain(consumer, 1, ack=False)
    await env.t.delete_group(stream, "g")
    with pytest.raises(GroupNotFoundError):
        await consumer.fetch(1, 0.1)
    with pytest.raises(GroupNotFoundError):
        await env.t.delete_group(stream, "g")


# -- ordered groups -----------------------------------------------------------------------------------


async def test_ordered_nack_rewinds_and_pauses_the_partition(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    for i in range(5):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    batch = await consumer.fetch(10, 5)
    assert [r.offset for r in batch] == [0, 1, 2, 3, 4]
    await batch[0].ack()
    await batch[1].ack()
    nacked = time.monotonic()
    await batch[2].nack(0.5)
    with pytest.raises(DeliveryNotOwnedError):
        await batch[3].ack()  # the rest of the batch was rewound with it
    again = await consumer.fetch(10, 5)
    assert time.monotonic() - nacked >= 0.45
    assert [(r.offset, r.delivery_count) for r in again] == [(2, 2), (3, 2), (4, 2)]
    for r in again:
        await r.ack()
    lag = await env.t.lag(stream, consumer.spec.group)  # type: ignore[attr-defined]
    assert (lag[0].committed, lag[0].lag) == (5, 0)


async def test_ordered_max_deliver_and_term_dead_letter_and_move_on(env: Env) -> None:
    stream, prefix = await env.stream()
    group = unique_name("o")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind="ordered", max_deliver=2))
    for i in range(3):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    (poison, *_rest) = await consumer.fetch(1, 5)
    await poison.nack(error=RuntimeError("boom 1"))
    (poison,) = await consumer.fetch(1, 5)
    await poison.nack(error=RuntimeError("boom 2"))  # the last allowed: dead-lettered
    (next_one,) = await consumer.fetch(1, 5)
    assert next_one.offset == 1
    await next_one.term("not wanted")
    (last,) = await consumer.fetch(1, 5)
    assert last.offset == 2
    await last.ack()
    letters = await env.t.read_dead_letters(stream, group)
    assert [(m.payload, m.headers[Headers.ERROR_MESSAGE]) for m in letters] == [
        (b"0", "boom 2"),
        (b"1", "not wanted"),
    ]
    assert letters[0].headers[Headers.DELIVERY_COUNT] == "2"


async def test_ordered_members_split_partitions_and_move_them_on_leave(env: Env) -> None:
    stream, prefix = await env.stream(partitions=4)
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    other = await env.another()
    members = [await env.t.consumer(stream, spec, member="a"), await other.consumer(stream, spec, member="b")]
    members.append(await env.t.consumer(stream, spec, member="c"))
    for i in range(40):
        await env.t.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
    got: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    acked = 0
    deadline = time.monotonic() + 10
    while acked < 40 and time.monotonic() < deadline:
        for i, member in enumerate(members):
            for r in await member.fetch(100, 0.05):
                got[i].add(r.partition)
                await r.ack()
                acked += 1
    assert acked == 40
    assert sorted(len(p) for p in got.values()) == [1, 1, 2], got
    assert not (got[0] & got[1] or got[1] & got[2] or got[0] & got[2])
    lag = await env.t.lag(stream, spec.group)
    assert {p.owner for p in lag} == {"a", "b", "c"}
    await members[1].close()
    for i in range(40, 60):
        await env.t.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
    remaining = [members[0], members[2]]
    seen = 0
    deadline = time.monotonic() + 10
    while seen < 20 and time.monotonic() < deadline:
        for member in remaining:
            for r in await member.fetch(100, 0.2):
                seen += 1
                await r.ack()
    assert seen == 20
    assert {p.owner for p in await env.t.lag(stream, spec.group)} == {"a", "c"}


async def test_a_crashed_ordered_member_is_replaced_in_order_with_its_counts(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    crashing = await env.another()
    doomed = await crashing.consumer(stream, spec)
    for i in range(5):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    batch = await doomed.fetch(10, 5)
    await batch[0].ack()
    await batch[1].ack()
    # The process dies: no leave, no more heartbeats (its pool simply goes away).
    doomed._heartbeats.cancel()  # type: ignore[attr-defined]
    crashing.core.closed = True
    env.others.remove(crashing)
    crashing.pool.terminate()
    crashing.group_pool.terminate()
    await crashing.core.close()
    heir = await env.t.consumer(stream, spec)
    got = await drain(heir, 3, timeout=10)
    assert [(r.offset, r.delivery_count) for r in got] == [(2, 2), (3, 2), (4, 2)]


async def test_a_member_whose_partition_was_taken_cannot_commit(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    slow = await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (held,) = await slow.fetch(1, 5)
    # Its heartbeats stop (a long pause) and another member takes the partition.
    slow._heartbeats.cancel()  # type: ignore[attr-defined]
    await asyncio.sleep(1.2)
    heir = await env.t.consumer(stream, spec)
    (taken,) = await drain(heir, 1, ack=False)
    with pytest.raises(DeliveryNotOwnedError):
        await held.ack()
    await taken.ack()


# -- core messaging ----------------------------------------------------------------------------------


async def test_core_messages_cross_transports_with_wildcards_and_large_payloads(env: Env) -> None:
    base = unique_name("core").replace("-", "_")
    other = await env.another()
    wide = await other.subscribe(f"{base}.>")
    one = await other.subscribe(f"{base}.*.created")
    await asyncio.sleep(0.2)  # the other transport's subscriptions reach this one
    big = bytes(random.getrandbits(8) for _ in range(50_000))
    await env.t.publish(f"{base}.eu.created", big, headers={"k": "v"})
    await env.t.publish(f"{base}.eu.deleted", b"small")
    first = await wide.next(5)
    assert (first.payload, first.headers) == (big, {"k": "v"}), "passed by reference, in order"
    assert (await wide.next(5)).payload == b"small"
    assert (await one.next(5)).payload == big
    with pytest.raises(TimeoutError):
        await one.next(0.3)
    await one.unsubscribe()
    await wide.unsubscribe()
    await asyncio.sleep(0.2)
    assert not any(p.startswith(base) for p, _ in env.t.core.interest.entries.values())


async def test_queue_groups_share_across_transports(env: Env) -> None:
    subject = f"{unique_name('q').replace('-', '_')}.work"
    other = await env.another()
    members = [await env.t.subscribe(subject, queue="w"), await other.subscribe(subject, queue="w")]
    plain = await other.subscribe(subject)
    await asyncio.sleep(0.2)
    for i in range(20):
        await env.t.publish(subject, str(i).encode())
    got: list[list[bytes]] = [[], []]
    for i, member in enumerate(members):
        with contextlib.suppress(TimeoutError):
            while True:
                got[i].append((await member.next(0.5)).payload)
    assert sorted(got[0] + got[1]) == sorted(str(i).encode() for i in range(20))
    assert got[0] and got[1]
    assert len([await plain.next(1) for _ in range(20)]) == 20, "a plain subscriber gets everything"


async def test_request_reply_across_transports_and_timeouts(env: Env) -> None:
    subject = f"{unique_name('svc').replace('-', '_')}.echo"
    other = await env.another()
    service = await other.subscribe(subject, queue="svc")
    await asyncio.sleep(0.2)

    async def serve() -> None:
        for _ in range(2):
            request = await service.next(5)
            assert request.headers[Headers.REPLY_TO].startswith("_INBOX.")
            await other.reply(request, request.payload[::-1])

    task = asyncio.create_task(serve())
    assert (await env.t.request(subject, b"abc", timeout=5)).payload == b"cba"
    assert (await env.t.request(subject, b"xyz", timeout=5)).payload == b"zyx"
    await task
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await env.t.request(f"{subject}.nobody", b"", timeout=0.3)  # no_responders: not knowable
    assert time.monotonic() - started >= 0.25


async def test_subscriptions_of_a_dead_process_are_pruned(env: Env) -> None:
    subject = f"{unique_name('dead').replace('-', '_')}.x"
    doomed = await env.another()
    await doomed.subscribe(subject)
    await asyncio.sleep(0.2)
    assert any(p == subject for p, _ in env.t.core.interest.entries.values())
    env.others.remove(doomed)
    doomed.core.closed = True  # dies without unsubscribing
    await doomed.core._conn.close()  # type: ignore[union-attr]
    doomed.pool.terminate()
    doomed.group_pool.terminate()
    await asyncio.sleep(0.2)
    await env.t.maintain()
    await asyncio.sleep(0.2)
    assert not any(p == subject for p, _ in env.t.core.interest.entries.values())


async def test_the_listen_connection_comes_back(env: Env) -> None:
    stream, prefix = await env.stream()
    patient = await env.another(poll_interval_s=30.0)  # only a NOTIFY wakes its consumers early
    subscription = await patient.subscribe(f"{prefix}.>")
    consumer = await patient.consumer(stream, ConsumerSpec(unique_name("g")))
    lost = patient.core.pid
    async with env.t.pool.acquire() as conn:
        await conn.execute("SELECT pg_terminate_backend($1)", lost)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if patient.core._conn is not None and patient.core.pid != lost:
            break
        await asyncio.sleep(0.05)
    assert patient.core.pid != lost
    await asyncio.sleep(0.2)  # its subscription is registered again, under the new backend
    waiting = asyncio.create_task(consumer.fetch(1, 10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await env.t.publish(f"{prefix}.x", b"after")
    assert (await subscription.next(5)).payload == b"after"
    (received,) = await waiting
    assert time.monotonic() - started < 2, "woken by the NOTIFY, not the 30s poll"
    await received.ack()


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_a_batch_acked_concurrently_is_committed_once_and_only_once(env: Env, kind: str) -> None:
    stream, prefix = await env.stream()
    group = unique_name("c")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind=kind))  # type: ignore[arg-type]
    await env.t.publish_batch([Message(f"{prefix}.x", str(i).encode()) for i in range(50)])
    batch = list(await consumer.fetch(50, 5))
    assert len(batch) == 50
    # The first is terminated while the others are acked: the dead letter is written before
    # anything commits past it.
    results = await asyncio.gather(
        batch[0].term("first one"),
        *(r.ack() for r in batch[1:]),
        batch[1].ack(),  # a second settlement of the same delivery, racing the first
        return_exceptions=True,
    )
    assert all(r is None for r in results[:50])
    assert isinstance(results[50], AlreadySettledError)
    assert sum(p.lag for p in await env.t.lag(stream, group)) == 0
    assert await consumer.fetch(10, 0.3) == []
    assert [m.payload for m in await env.t.read_dead_letters(stream, group)] == [b"0"]
    await consumer.close()
    again = await env.t.consumer(stream, ConsumerSpec(group, kind=kind))  # type: ignore[arg-type]
    assert await again.fetch(10, 0.3) == [], "everything stayed settled"


# -- listing and purging ----------------------------------------------------------------------------


async def test_purge_drops_what_members_hold_once_they_give_it_back(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    group = unique_name("g")
    shared = await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=0.5))
    ordered = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    for i in range(8):
        await env.t.publish(f"{prefix}.old", f"old{i}".encode(), key=f"k{i}")
    held = await drain(shared, 4, ack=False)
    batch = await drain(ordered, 1, ack=False)
    await held[0].term("poison")
    await env.t.purge_stream(stream)
    await held[1].ack()  # settling what was held still works
    await held[2].nack()  # comes back to no message: dropped
    await batch[0].nack()  # the partition rewinds onto the gap
    for i in range(3):
        await env.t.publish(f"{prefix}.new", f"new{i}".encode(), key=f"k{i}")
    await asyncio.sleep(0.6)  # held[3]'s lease expires too
    new = [f"new{i}".encode() for i in range(3)]
    for consumer in (shared, ordered, await env.t.consumer(stream, ConsumerSpec(unique_name("g")))):
        assert sorted(r.message.payload for r in await drain(consumer, 4, timeout=2)) == new
    assert (await env.t.stream_state(stream)).messages == 3
    assert [m.payload for m in await env.t.read_dead_letters(stream, group)] == [held[0].message.payload]
    assert sum(lag.lag for lag in await env.t.lag(stream, group)) == 0


async def test_listing_names_the_schemas_streams_only(env: Env) -> None:
    assert await env.t.list_streams() == []
    first, _ = await env.stream()
    second, _ = await env.stream(partitions=3)
    group = unique_name("g")
    await env.t.consumer(first, ConsumerSpec(group))
    other = await env.another()
    assert await other.list_streams() == sorted([first, second, f"{first}-{group}-dlq"])
    await env.t.delete_stream(first)
    assert await other.list_streams() == [second]
    with pytest.raises(StreamNotFoundError):
        await other.purge_stream(first)
