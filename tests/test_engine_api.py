"""Behaviour of the embedded engine's public API: publish, read, dedup, expectations, errors.

Every test talks to a real engine on a temporary data folder; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pigeon.engine import (
    BatchAck,
    Engine,
    Expect,
    PubAck,
    StartAt,
    StreamConfig,
    StreamInfo,
)
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import (
    ConcurrencyConflictError,
    DataDirLockedError,
    EngineClosedError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidNameError,
    InvalidSubjectError,
    MessageTooLargeError,
    NoStreamForSubjectError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
)
from pigeon.message import Message

MiB = 1024 * 1024
HAS_PUBLISH_MANY = hasattr(Engine, "publish_many")
needs_publish_many = pytest.mark.skipif(not HAS_PUBLISH_MANY, reason="Engine.publish_many missing")

# The folder lock is per open file description, so another process is the honest test.
LOCK_PROBE = """
import asyncio, sys
from pigeon.engine import Engine
from pigeon.errors import DataDirLockedError

async def main():
    try:
        engine = await Engine.open(sys.argv[1])
    except DataDirLockedError as exc:
        print("LOCKED", exc.pid)
        print(exc)
        return
    print("OPENED", ",".join(engine.streams()))
    await engine.close()

asyncio.run(main())
"""


# -- helpers ---------------------------------------------------------------------------------


def cfg(name: str = "orders", subjects: tuple[str, ...] = ("orders.>",), **kw: Any) -> StreamConfig:
    return StreamConfig(name, subjects, **kw)


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    e = await Engine.open(data_dir)
    yield e
    await e.close()


async def read_all(
    engine: Engine, stream: str, partition: int, start: StartAt | None = None
) -> list[Message]:
    return [m async for m in engine.read(stream, partition, start)]


async def read_stream(engine: Engine, stream: str) -> dict[int, list[Message]]:
    info = engine.stream_info(stream)
    return {p.partition: await read_all(engine, stream, p.partition) for p in info.partitions}


def snapshot(engine: Engine, stream: str) -> tuple[Any, ...]:
    """Everything observable about a stream's log, to prove a failed call changed nothing."""
    info = engine.stream_info(stream)
    contents = tuple(
        tuple(
            (m.offset, m.subject, m.payload, m.key, tuple(m.headers.items()), m.id)
            for m in engine.fetch(stream, p.partition, 0, 10**6)
        )
        for p in info.partitions
    )
    bounds = tuple((p.first_offset, p.next_offset, p.messages, p.bytes) for p in info.partitions)
    return info.messages, info.bytes, bounds, contents


def uuid_ms(text: str) -> int:
    return uuid.UUID(text).int >> 80


def assert_uuid7(text: str) -> None:
    value = uuid.UUID(text)
    assert value.version == 7, text
    assert value.variant == uuid.RFC_4122, text
    assert str(value) == text, "ids are canonical lowercase UUID text"


def assert_strictly_increasing_ids(messages: list[Message]) -> None:
    ids = [uuid.UUID(m.id).int for m in messages]
    for (a, ma), (b, mb) in itertools.pairwise(zip(ids, messages, strict=True)):
        assert b > a, f"id of offset {mb.offset} ({mb.id}) is not above offset {ma.offset} ({ma.id})"


# -- publish and read round trip -------------------------------------------------------------


async def test_round_trip_keeps_every_field(engine: Engine) -> None:
    await engine.create_stream(cfg())
    before = time.time()
    ack = await engine.publish(
        "orders.eu.created",
        b"\x00payload\xff",
        key="customer-7",
        headers={"trace": "abc", "Ünïcode": "välue", "empty": ""},
        msg_id="order-1",
    )
    after = time.time()
    assert isinstance(ack, PubAck)
    assert ack == PubAck("orders", 0, 0, False)

    [m] = await read_all(engine, "orders", 0)
    assert m.subject == "orders.eu.created"
    assert m.payload == b"\x00payload\xff"
    assert m.key == "customer-7"
    assert m.headers == {"trace": "abc", "Ünïcode": "välue", "empty": ""}
    assert m.id == "order-1"
    assert m.has_explicit_id
    assert (m.stream, m.partition, m.offset) == ("orders", 0, 0)
    assert before - 0.01 <= m.timestamp <= after + 0.01


async def test_publisher_timestamp_is_not_stored(engine: Engine) -> None:
    await engine.create_stream(cfg())
    before = time.time()
    await engine.publish_batch([Message("orders.x", b"x", timestamp=1_000_000.0)])
    [m] = await read_all(engine, "orders", 0)
    assert m.timestamp >= before - 0.01, "the append time is stored, not the publisher's"


async def test_round_trip_of_plain_and_empty_messages(engine: Engine) -> None:
    await engine.create_stream(cfg())
    await engine.publish("orders.a", b"")
    await engine.publish("orders.b")
    await engine.publish("orders.c", b"x" * 100_000)
    msgs = await read_all(engine, "orders", 0)
    assert [(m.subject, m.payload, m.key, m.headers) for m in msgs] == [
        ("orders.a", b"", None, {}),
        ("orders.b", b"", None, {}),
        ("orders.c", b"x" * 100_000, None, {}),
    ]
    assert [m.offset for m in msgs] == [0, 1, 2]
    assert not any(m.has_explicit_id for m in msgs)


async def test_generated_ids_are_uuid7_and_strictly_increasing_per_partition(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3, durability="never"))
    for i in range(300):
        await engine.publish("orders.x", b"%d" % i, key=None if i % 3 else f"k{i}")
    for n in range(20):
        await engine.publish_batch(
            [Message("orders.y", b"b", key=None if j % 2 else f"k{j}") for j in range(n + 1)]
        )
    by_partition = await read_stream(engine, "orders")
    all_ids = [m.id for msgs in by_partition.values() for m in msgs]
    assert len(all_ids) == 300 + sum(range(1, 21))
    assert len(set(all_ids)) == len(all_ids), "generated ids are unique"
    for msgs in by_partition.values():
        assert msgs, "every partition got messages"
        for m in msgs:
            assert_uuid7(m.id)
            # The id's time field is the storage time in milliseconds.
            assert abs(uuid_ms(m.id) - m.timestamp * 1000) < 1000
        assert_strictly_increasing_ids(msgs)


async def test_generated_ids_are_stable_across_reads_and_reopen(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    await engine.publish("orders.x", b"1")
    await engine.publish_batch([Message("orders.x", b"2"), Message("orders.x", b"3")])
    first = [m.id for m in await read_all(engine, "orders", 0)]
    second = [m.id for m in await read_all(engine, "orders", 0)]
    assert first == second
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert [m.id for m in await read_all(engine, "orders", 0)] == first
    finally:
        await engine.close()


async def test_offsets_are_dense_from_zero_per_partition(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=4))
    acks = [await engine.publish("orders.x", b"%d" % i, key=f"key-{i % 13}") for i in range(200)]
    per_partition: dict[int, list[int]] = {}
    for ack in acks:
        per_partition.setdefault(ack.partition, []).append(ack.offset)
    assert len(per_partition) > 1
    for p, offsets in per_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {p}"
        msgs = await read_all(engine, "orders", p)
        assert [m.offset for m in msgs] == offsets
        assert all(m.partition == p and m.stream == "orders" for m in msgs)
    info = engine.stream_info("orders")
    assert info.messages == 200
    for pinfo in info.partitions:
        assert pinfo.first_offset == 0
        assert pinfo.next_offset == len(per_partition.get(pinfo.partition, []))


async def test_timestamps_never_go_backwards(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="never"))
    for i in range(200):
        if i % 50 == 0:
            await engine.publish_batch([Message("orders.x", b"b") for _ in range(10)])
        await engine.publish("orders.x", b"%d" % i)
    msgs = await read_all(engine, "orders", 0)
    stamps = [m.timestamp for m in msgs]
    assert stamps == sorted(stamps)
    info = engine.stream_info("orders").partitions[0]
    assert info.last_timestamp == pytest.approx(stamps[-1])


async def test_batch_ack_is_a_sequence_of_pub_acks(engine: Engine) -> None:
    await engine.create_stream(cfg())
    acks = await engine.publish_batch(
        [Message("orders.x", b"a", id="a"), Message("orders.x", b"b"), Message("orders.x", b"a", id="a")]
    )
    assert isinstance(acks, BatchAck)
    assert len(acks) == 3
    assert list(acks) == [
        PubAck("orders", 0, 0, False),
        PubAck("orders", 0, 1, False),
        PubAck("orders", 0, 0, True),
    ]
    assert acks.duplicates == 1
    assert acks[1] == PubAck("orders", 0, 1, False)
    with pytest.raises(IndexError):
        acks[3]


async def test_batch_ack_supports_negative_indexes_and_slices(engine: Engine) -> None:
    await engine.create_stream(cfg())
    acks = await engine.publish_batch(
        [Message("orders.x", b"a", id="a"), Message("orders.x", b"b"), Message("orders.x", b"a", id="a")]
    )
    assert acks[-1] == acks[2] == PubAck("orders", 0, 0, True)
    assert list(acks[1:]) == [acks[1], acks[2]]


# -- partitioning ----------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [2, 7])
async def test_keyed_messages_go_to_the_kafka_partition(engine: Engine, partitions: int) -> None:
    await engine.create_stream(cfg(partitions=partitions))
    keys = [f"customer-{i}" for i in range(60)] + ["", "ü-ключ", "x" * 1000]
    for round_ in range(2):
        for key in keys:
            ack = await engine.publish("orders.x", key.encode() + b"|%d" % round_, key=key)
            assert ack.partition == partition_for_key(key.encode(), partitions), key
    batch = await engine.publish_batch([Message("orders.y", b"b", key=k) for k in keys])
    assert [a.partition for a in batch] == [partition_for_key(k.encode(), partitions) for k in keys]

    seen: dict[str, set[int]] = {}
    for p, msgs in (await read_stream(engine, "orders")).items():
        for m in msgs:
            assert m.key is not None
            seen.setdefault(m.key, set()).add(p)
    assert set(seen) == set(keys)
    for key, where in seen.items():
        assert where == {partition_for_key(key.encode(), partitions)}, "same key, same partition"


async def test_unkeyed_publishes_rotate_between_calls(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=4))
    acks = [await engine.publish("orders.x", b"%d" % i) for i in range(400)]
    counts = Counter(a.partition for a in acks)
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(a.partition != b.partition for a, b in itertools.pairwise(acks)), "calls rotate"


async def test_unkeyed_messages_of_one_call_stay_together(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3))
    used = []
    for n in range(9):
        acks = await engine.publish_batch([Message("orders.x", b"%d" % i) for i in range(10)])
        partitions = {a.partition for a in acks}
        assert len(partitions) == 1, "one call's unkeyed messages share a partition"
        [p] = partitions
        offsets = [a.offset for a in acks]
        assert offsets == list(range(offsets[0], offsets[0] + 10)), "and are contiguous"
        used.append(p)
        assert n == 0 or used[-1] != used[-2]
    assert Counter(used) == {0: 3, 1: 3, 2: 3}

    mixed = await engine.publish_batch(
        [Message("orders.m", b"u1"), Message("orders.m", b"k", key="abc"), Message("orders.m", b"u2")]
    )
    assert mixed[0].partition == mixed[2].partition
    assert mixed[1].partition == partition_for_key(b"abc", 3)
    if mixed[1].partition == mixed[0].partition:
        assert [a.offset for a in mixed] == [mixed[0].offset + i for i in range(3)]
    else:
        assert mixed[2].offset == mixed[0].offset + 1


# -- reading ---------------------------------------------------------------------------------


async def test_read_from_earliest_offset_and_latest(engine: Engine) -> None:
    await engine.create_stream(cfg())
    for i in range(10):
        await engine.publish("orders.x", b"%d" % i)
    assert [m.payload for m in await read_all(engine, "orders", 0)] == [b"%d" % i for i in range(10)]
    assert [m.payload for m in await read_all(engine, "orders", 0, StartAt.earliest())] == [
        b"%d" % i for i in range(10)
    ]
    assert [m.offset for m in await read_all(engine, "orders", 0, StartAt.offset(7))] == [7, 8, 9]
    assert await read_all(engine, "orders", 0, StartAt.offset(10)) == []
    assert await read_all(engine, "orders", 0, StartAt.offset(999)) == []

    assert engine.resolve("orders", 0, StartAt.earliest()) == 0
    latest = engine.resolve("orders", 0, StartAt.latest())
    assert latest == 10
    assert await read_all(engine, "orders", 0, StartAt.latest()) == []
    await engine.publish("orders.x", b"new")
    assert [m.payload for m in await read_all(engine, "orders", 0, StartAt.offset(latest))] == [b"new"]


async def test_start_at_rejects_nonsense() -> None:
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(InvalidConfigError):
            StartAt.offset(bad)  # type: ignore[arg-type]
    for bad in ("now", None, True):
        with pytest.raises(InvalidConfigError):
            StartAt.time(bad)  # type: ignore[arg-type]


async def test_read_from_time_finds_the_group_boundary(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(segment_bytes=4096))
    for i in range(100):
        await engine.publish("orders.x", b"a%03d" % i + b"." * 60)
    await asyncio.sleep(0.05)
    boundary = time.time()
    await asyncio.sleep(0.05)
    for i in range(100):
        await engine.publish("orders.x", b"b%03d" % i + b"." * 60)
    assert engine.stream_info("orders").partitions[0].segments > 2

    async def check(e: Engine) -> None:
        assert e.resolve("orders", 0, StartAt.time(boundary)) == 100
        later = await read_all(e, "orders", 0, StartAt.time(boundary))
        assert [m.payload[:4] for m in later] == [b"b%03d" % i for i in range(100)]
        assert all(m.timestamp >= boundary for m in later)
        assert len(await read_all(e, "orders", 0, StartAt.time(boundary - 3600))) == 200
        assert e.resolve("orders", 0, StartAt.time(time.time() + 3600)) == 200
        assert await read_all(e, "orders", 0, StartAt.time(time.time() + 3600)) == []

    await check(engine)
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        await check(engine)
    finally:
        await engine.close()


async def test_read_from_a_message_timestamp_includes_that_message(engine: Engine) -> None:
    await engine.create_stream(cfg(segment_bytes=4096))
    for i in range(120):
        await engine.publish("orders.x", b"%03d" % i + b"." * 80)
        if i % 10 == 0:
            await asyncio.sleep(0.002)
    msgs = await read_all(engine, "orders", 0)
    wrong = []
    for m in msgs:
        expected = min(x.offset for x in msgs if x.timestamp >= m.timestamp)
        got = engine.resolve("orders", 0, StartAt.time(m.timestamp))
        if got != expected:
            wrong.append((m.offset, got))
    assert wrong == [], "first message at or after t, t being a stored message's own timestamp"


async def test_last_message_of_a_subject(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3))
    assert engine.last_message("orders", "orders.a") is None
    await engine.publish("orders.a", b"a1", key="k1")
    await engine.publish("orders.b", b"b1", key="k2")
    await engine.publish("orders.a", b"a2", key="k3")
    await engine.publish("orders.b", b"b2", key="k1")
    await engine.publish("orders.a", b"a3", key="k2")
    last_a = engine.last_message("orders", "orders.a")
    assert last_a is not None
    assert (last_a.payload, last_a.key, last_a.partition) == (
        b"a3",
        "k2",
        partition_for_key(b"k2", 3),
    )
    last_b = engine.last_message("orders", "orders.b")
    assert last_b is not None and last_b.payload == b"b2"
    assert engine.last_message("orders", "orders.c") is None
    with pytest.raises(InvalidSubjectError):
        engine.last_message("orders", "orders.*")
    with pytest.raises(StreamNotFoundError):
        engine.last_message("nope", "orders.a")


async def test_read_streams_a_log_larger_than_one_chunk(engine: Engine) -> None:
    total = 50_000
    await engine.create_stream(cfg(durability="never", segment_bytes=256 * 1024))
    for start in range(0, total, 5000):
        await engine.publish_batch([Message("orders.x", b"%06d" % i) for i in range(start, start + 5000)])
    assert engine.stream_info("orders").partitions[0].segments > 3

    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    count = 0
    async for m in engine.read("orders", 0):
        assert m.offset == count
        assert m.payload == b"%06d" % count
        count += 1
    stop.set()
    await task
    assert count == total
    assert ticks >= 10, "read() gives other tasks a turn between chunks instead of loading everything"


async def test_fetch_limits(engine: Engine) -> None:
    await engine.create_stream(cfg())
    for i in range(20):
        await engine.publish("orders.x", b"%02d" % i + b"." * 98)  # 100-byte payloads
    assert [m.offset for m in engine.fetch("orders", 0, 0, 5)] == [0, 1, 2, 3, 4]
    assert [m.offset for m in engine.fetch("orders", 0, 17, 100)] == [17, 18, 19]
    assert engine.fetch("orders", 0, 20, 100) == []
    assert engine.fetch("orders", 0, 500, 100) == []
    assert engine.fetch("orders", 0, 0, 0) == []
    assert [m.offset for m in engine.fetch("orders", 0, 3, 100, max_bytes=350)] == [3, 4, 5]
    # A message bigger than max_bytes is still returned alone, so a reader always progresses.
    assert [m.offset for m in engine.fetch("orders", 0, 3, 100, max_bytes=10)] == [3]
    assert len(engine.fetch("orders", 0, 0, 100, max_bytes=10**9)) == 20


async def test_fetch_honours_max_messages_together_with_max_bytes(engine: Engine) -> None:
    await engine.create_stream(cfg())
    await engine.publish_batch([Message("orders.x", b"x" * 10) for _ in range(10)])
    assert [m.offset for m in engine.fetch("orders", 0, 0, 2, max_bytes=10_000)] == [0, 1]
    assert [m.offset for m in engine.fetch("orders", 0, 0, 2, max_bytes=50)] == [0, 1]


async def test_wait_for_data(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=2))
    started = time.monotonic()
    assert await engine.wait_for_data("orders", 0, 0, timeout=0.2) is False
    assert time.monotonic() - started >= 0.15

    waiter = asyncio.create_task(engine.wait_for_data("orders", 0, 0, timeout=10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    key_for_0 = next(k for k in (f"k{i}" for i in range(100)) if partition_for_key(k.encode(), 2) == 0)
    started = time.monotonic()
    await engine.publish("orders.x", b"hello", key=key_for_0)
    assert await asyncio.wait_for(waiter, 2) is True
    assert time.monotonic() - started < 1, "woken by the publish, not by the timeout"

    assert await engine.wait_for_data("orders", 0, 0, timeout=0) is True, "data already there"
    assert await engine.wait_for_data("orders", 0, 1, timeout=0.05) is False

    # A publish to another partition does not satisfy a wait on this one.
    key_for_1 = next(k for k in (f"k{i}" for i in range(100)) if partition_for_key(k.encode(), 2) == 1)
    waiter = asyncio.create_task(engine.wait_for_data("orders", 0, 1, timeout=0.3))
    await asyncio.sleep(0.02)
    await engine.publish("orders.x", b"elsewhere", key=key_for_1)
    assert await waiter is False


async def test_wait_for_data_pending_when_the_engine_closes(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    waiter = asyncio.create_task(engine.wait_for_data("orders", 0, 0, timeout=5))
    await asyncio.sleep(0.05)
    await engine.close()
    try:
        result = await waiter
    except EngineClosedError:
        result = False
    except asyncio.CancelledError:
        result = "cancelled"
    assert result is False
    assert not waiter.cancelled()


# -- deduplication ---------------------------------------------------------------------------


async def test_duplicate_msg_id_is_acked_with_the_original_position(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3))
    await engine.publish("orders.x", b"filler")
    first = await engine.publish("orders.x", b"original", msg_id="m-1", key="a")
    before = snapshot(engine, "orders")
    again = await engine.publish("orders.x", b"different payload", msg_id="m-1", key="zzz")
    assert again.duplicate is True
    assert (again.stream, again.partition, again.offset) == (first.stream, first.partition, first.offset)
    assert first.duplicate is False
    assert snapshot(engine, "orders") == before, "nothing written for a duplicate"
    batch = await engine.publish_batch([Message("orders.x", b"again", id="m-1")])
    assert batch[0] == PubAck("orders", first.partition, first.offset, True)
    assert snapshot(engine, "orders") == before
    [stored] = engine.fetch("orders", first.partition, first.offset, 1)
    assert stored.payload == b"original"


async def test_duplicate_is_written_again_after_the_window(engine: Engine) -> None:
    await engine.create_stream(cfg(dedup_window_s=0.2))
    first = await engine.publish("orders.x", b"1", msg_id="m")
    assert (await engine.publish("orders.x", b"2", msg_id="m")).duplicate
    await asyncio.sleep(0.3)
    later = await engine.publish("orders.x", b"3", msg_id="m")
    assert later.duplicate is False
    assert later.offset == first.offset + 1
    assert [m.payload for m in await read_all(engine, "orders", 0)] == [b"1", b"3"]
    assert (await engine.publish("orders.x", b"4", msg_id="m")).duplicate, "the window restarts"


async def test_a_generated_id_read_before_publishing_drives_dedup(engine: Engine) -> None:
    await engine.create_stream(cfg())
    message = Message("orders.x", b"once")
    chosen = message.id  # reading it fixes it: from now on it is the publisher's id
    first = await engine.publish_batch([message])
    again = await engine.publish_batch([message])
    assert (first[0].duplicate, again[0].duplicate) == (False, True)
    assert again[0].offset == first[0].offset
    [stored] = await read_all(engine, "orders", 0)
    assert stored.id == chosen


async def test_zero_dedup_window_disables_dedup(engine: Engine) -> None:
    await engine.create_stream(cfg(dedup_window_s=0))
    a = await engine.publish("orders.x", b"1", msg_id="m")
    b = await engine.publish("orders.x", b"2", msg_id="m")
    assert (a.offset, a.duplicate, b.offset, b.duplicate) == (0, False, 1, False)


async def test_duplicates_inside_one_batch(engine: Engine) -> None:
    await engine.create_stream(cfg())
    await engine.publish("orders.x", b"old", msg_id="stored")
    acks = await engine.publish_batch(
        [
            Message("orders.x", b"a", id="a"),
            Message("orders.x", b"b", id="b"),
            Message("orders.x", b"a again", id="a"),
            Message("orders.x", b"stored again", id="stored"),
            Message("orders.x", b"c"),
        ]
    )
    assert [(a.offset, a.duplicate) for a in acks] == [
        (1, False),
        (2, False),
        (1, True),
        (0, True),
        (3, False),
    ]
    assert acks.duplicates == 2
    msgs = await read_all(engine, "orders", 0)
    assert [(m.offset, m.payload) for m in msgs] == [(0, b"old"), (1, b"a"), (2, b"b"), (3, b"c")]
    assert engine.stream_info("orders").messages == 4


@pytest.mark.parametrize("durability", ["always", "interval", "never"])
async def test_dedup_survives_close_and_reopen(data_dir: Path, durability: str) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(partitions=3, durability=durability))
    originals = {}
    for i in range(30):
        ack = await engine.publish("orders.x", b"%d" % i, msg_id=f"id-{i}", key=f"k{i}")
        originals[f"id-{i}"] = (ack.partition, ack.offset)
    await engine.close()

    engine = await Engine.open(data_dir)
    try:
        before = snapshot(engine, "orders")
        for msg_id, where in originals.items():
            ack = await engine.publish("orders.x", b"retry", msg_id=msg_id)
            assert ack.duplicate, msg_id
            assert (ack.partition, ack.offset) == where
        assert snapshot(engine, "orders") == before
    finally:
        await engine.close()


async def test_concurrent_single_publishes_of_one_id_store_it_once(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="always"))
    acks = await asyncio.gather(*(engine.publish("orders.x", b"x", msg_id="same") for _ in range(10)))
    assert sum(not a.duplicate for a in acks) == 1
    assert {a.offset for a in acks} == {0}
    assert engine.stream_info("orders").messages == 1


async def test_concurrent_batches_with_one_id_store_it_once(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="never"))
    acks = await asyncio.gather(
        *(engine.publish_batch([Message("orders.x", b"x", id="same")]) for _ in range(5))
    )
    assert sum(not a[0].duplicate for a in acks) == 1
    assert {a[0].offset for a in acks} == {0}
    assert engine.stream_info("orders").messages == 1


# -- optimistic concurrency ------------------------------------------------------------------


async def test_expect_last_offset(engine: Engine) -> None:
    await engine.create_stream(cfg())
    a = await engine.publish("orders.x", b"1", expect=Expect(last_offset=-1))
    b = await engine.publish("orders.y", b"2", expect=Expect(last_offset=0))
    assert (a.offset, b.offset) == (0, 1)
    before = snapshot(engine, "orders")
    for wrong in (-1, 0, 2, 100):
        with pytest.raises(ConcurrencyConflictError) as info:
            await engine.publish("orders.x", b"3", expect=Expect(last_offset=wrong))
        assert (info.value.expected, info.value.actual) == (wrong, 1)
        assert str(wrong) in str(info.value) and "1" in str(info.value)
        assert snapshot(engine, "orders") == before, "a conflict writes nothing"
    with pytest.raises(ConcurrencyConflictError):
        await engine.publish_batch(
            [Message("orders.x", b"3"), Message("orders.x", b"4")], expect=Expect(last_offset=0)
        )
    assert snapshot(engine, "orders") == before
    acks = await engine.publish_batch(
        [Message("orders.x", b"3"), Message("orders.x", b"4")], expect=Expect(last_offset=1)
    )
    assert [a.offset for a in acks] == [2, 3]


async def test_expect_last_subject_offset(engine: Engine) -> None:
    await engine.create_stream(cfg())
    assert (await engine.publish("orders.a", b"a0", expect=Expect(last_subject_offset=-1))).offset == 0
    assert (await engine.publish("orders.b", b"b0", expect=Expect(last_subject_offset=-1))).offset == 1
    await engine.publish("orders.c", b"c0")
    assert (await engine.publish("orders.a", b"a1", expect=Expect(last_subject_offset=0))).offset == 3
    before = snapshot(engine, "orders")
    with pytest.raises(ConcurrencyConflictError) as info:
        await engine.publish("orders.a", b"a2", expect=Expect(last_subject_offset=0))
    assert (info.value.expected, info.value.actual) == (0, 3)
    assert "orders.a" in str(info.value)
    with pytest.raises(ConcurrencyConflictError) as info:
        await engine.publish("orders.new", b"n", expect=Expect(last_subject_offset=3))
    assert (info.value.expected, info.value.actual) == (3, -1)
    with pytest.raises(ConcurrencyConflictError):
        await engine.publish("orders.b", b"b1", expect=Expect(last_offset=3, last_subject_offset=0))
    assert snapshot(engine, "orders") == before
    ok = await engine.publish("orders.b", b"b1", expect=Expect(last_offset=3, last_subject_offset=1))
    assert ok.offset == 4


async def test_expectations_on_a_keyed_partition(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=4))
    p = partition_for_key(b"account-1", 4)
    a = await engine.publish("orders.x", b"1", key="account-1", expect=Expect(last_offset=-1))
    assert (a.partition, a.offset) == (p, 0)
    with pytest.raises(ConcurrencyConflictError) as info:
        await engine.publish("orders.x", b"2", key="account-1", expect=Expect(last_offset=-1))
    assert (info.value.expected, info.value.actual) == (-1, 0)
    b = await engine.publish("orders.x", b"2", key="account-1", expect=Expect(last_offset=0))
    assert (b.partition, b.offset) == (p, 1)


async def test_concurrent_batches_with_one_expectation_let_only_one_win(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="never"))
    results = await asyncio.gather(
        *(
            engine.publish_batch([Message("orders.x", b"%d" % i)], expect=Expect(last_offset=-1))
            for i in range(5)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, BatchAck) for r in results) == 1
    assert sum(isinstance(r, ConcurrencyConflictError) for r in results) == 4
    assert engine.stream_info("orders").messages == 1


async def test_concurrent_single_publishes_with_one_expectation_let_only_one_win(
    engine: Engine,
) -> None:
    await engine.create_stream(cfg(durability="always"))
    results = await asyncio.gather(
        *(engine.publish("orders.x", b"%d" % i, expect=Expect(last_offset=-1)) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, PubAck) for r in results) == 1
    assert sum(isinstance(r, ConcurrencyConflictError) for r in results) == 4
    assert engine.stream_info("orders").messages == 1


async def test_retried_publish_with_expectation_is_a_duplicate_not_a_conflict(engine: Engine) -> None:
    await engine.create_stream(cfg())
    first = await engine.publish("orders.x", b"1", msg_id="cmd-1", expect=Expect(last_subject_offset=-1))
    retry = await engine.publish("orders.x", b"1", msg_id="cmd-1", expect=Expect(last_subject_offset=-1))
    assert retry == PubAck("orders", 0, first.offset, True)
    assert engine.stream_info("orders").messages == 1


async def test_retried_batch_with_expectation_is_a_duplicate_not_an_error(engine: Engine) -> None:
    await engine.create_stream(cfg())
    batch = [Message("orders.x", b"1", id="cmd-1")]
    first = await engine.publish_batch(batch, expect=Expect(last_subject_offset=-1))
    retry = await engine.publish_batch(
        [Message("orders.x", b"1", id="cmd-1")], expect=Expect(last_subject_offset=-1)
    )
    assert retry[0] == PubAck("orders", 0, first[0].offset, True)
    assert engine.stream_info("orders").messages == 1


async def test_expectation_with_messages_for_several_partitions_is_refused(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=4))
    home = partition_for_key(b"a", 4)
    keys = [k for k in ("b", "c", "d", "e", "f", "g") if partition_for_key(k.encode(), 4) != home]
    with pytest.raises(InvalidMessageError, match="one partition"):
        await engine.publish_batch(
            [Message("orders.x", b"1", key="a"), Message("orders.x", b"2", key=keys[0])],
            expect=Expect(last_offset=-1),
        )
    assert engine.stream_info("orders").messages == 0


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "has space", "dots.not.allowed", "x" * 65, "slash/", "é", "*"])
async def test_invalid_stream_names(engine: Engine, name: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        StreamConfig(name, ("orders.>",))
    assert repr(name) in str(info.value)
    for call in (
        lambda: engine.stream_info(name),
        lambda: engine.fetch(name, 0, 0),
        lambda: engine.last_message(name, "orders.x"),
    ):
        with pytest.raises(InvalidNameError):
            call()
    with pytest.raises(InvalidNameError):
        await engine.delete_stream(name)
    assert engine.streams() == []


async def test_invalid_stream_name_types() -> None:
    for name in (None, 5, b"orders"):
        with pytest.raises(InvalidNameError):
            StreamConfig(name, ("orders.>",))  # type: ignore[arg-type]
    assert StreamConfig("A-z_09" + "x" * 58, ("a",)).name == "A-z_09" + "x" * 58


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a.", "a b", "a.>.b", "a*", "a.b>", "a\tb"])
async def test_invalid_subject_patterns_in_stream_config(subject: str) -> None:
    with pytest.raises(InvalidSubjectError):
        StreamConfig("s", (subject,))


async def test_stream_subjects_must_be_a_non_empty_collection() -> None:
    with pytest.raises(InvalidConfigError, match="subjects"):
        StreamConfig("s", "orders.>")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="subjects"):
        StreamConfig("s", ())


@pytest.mark.parametrize(
    "subject", ["orders.*", "orders.>", ">", "*", "", "orders..x", "orders. x", "orders.x ", ".orders"]
)
async def test_publish_to_an_invalid_subject(engine: Engine, subject: str) -> None:
    await engine.create_stream(cfg())
    await engine.publish("orders.x", b"seed")
    before = snapshot(engine, "orders")
    with pytest.raises(InvalidSubjectError):
        await engine.publish(subject, b"x")
    with pytest.raises(InvalidSubjectError):
        await engine.publish_batch([Message(subject, b"x")])
    assert snapshot(engine, "orders") == before


async def test_publish_to_a_subject_no_stream_captures(engine: Engine) -> None:
    await engine.create_stream(cfg())
    before = snapshot(engine, "orders")
    for subject in ("payments.x", "orders", "ordersx.y"):
        with pytest.raises(NoStreamForSubjectError) as info:
            await engine.publish(subject, b"x")
        assert repr(subject) in str(info.value)
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish_batch([Message("payments.x", b"x")])
    assert snapshot(engine, "orders") == before


async def test_batch_must_go_to_one_stream(engine: Engine) -> None:
    await engine.create_stream(cfg())
    await engine.create_stream(cfg("payments", ("payments.>",)))
    before = (snapshot(engine, "orders"), snapshot(engine, "payments"))
    with pytest.raises(InvalidConfigError, match="one stream"):
        await engine.publish_batch([Message("orders.x", b"1"), Message("payments.x", b"2")])
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish_batch([Message("orders.x", b"1"), Message("nowhere.x", b"2")])
    with pytest.raises(InvalidSubjectError):
        await engine.publish_batch([Message("orders.x", b"1"), Message("orders.*", b"2")])
    with pytest.raises(InvalidConfigError):
        await engine.publish_batch([])
    assert (snapshot(engine, "orders"), snapshot(engine, "payments")) == before


@pytest.mark.parametrize(
    "position",
    [0, 1],
)
async def test_batch_of_non_messages_is_refused(engine: Engine, position: int) -> None:
    await engine.create_stream(cfg())
    batch: list[Any] = [Message("orders.x", b"1")]
    batch.insert(position, "not a message")
    with pytest.raises((InvalidConfigError, InvalidMessageError)):
        await engine.publish_batch(batch)
    assert engine.stream_info("orders").messages == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("orders.>",), ("orders.eu.created",)),
        (("orders.>",), ("orders.*",)),
        (("orders.*.created",), ("*.eu.*",)),
        (("a.b", "c.>"), ("x.y", "c.d.e")),
        ((">",), ("anything",)),
    ],
)
async def test_overlapping_stream_subjects(
    engine: Engine, data_dir: Path, first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    await engine.create_stream(StreamConfig("one", first))
    with pytest.raises(SubjectOverlapError) as info:
        await engine.create_stream(StreamConfig("two", second))
    assert "'one'" in str(info.value)
    assert engine.streams() == ["one"]
    assert not (data_dir / "streams" / "two").exists()


async def test_disjoint_stream_subjects_route_to_their_stream(engine: Engine) -> None:
    await engine.create_stream(cfg("many", ("orders.>",)))
    await engine.create_stream(cfg("bare", ("orders",)))
    await engine.create_stream(cfg("two", ("payments.*",)))
    await engine.create_stream(cfg("three", ("payments.*.*",)))
    assert (await engine.publish("orders.x.y", b"")).stream == "many"
    assert (await engine.publish("orders", b"")).stream == "bare"
    assert (await engine.publish("payments.a", b"")).stream == "two"
    assert (await engine.publish("payments.a.b", b"")).stream == "three"
    assert engine.streams() == ["bare", "many", "three", "two"]


async def test_create_existing_stream(engine: Engine) -> None:
    config = cfg(partitions=2, max_age_s=3600.5, dedup_window_s=60)
    info = await engine.create_stream(config)
    assert isinstance(info, StreamInfo) and info.config == config
    await engine.publish("orders.x", b"kept")
    again = await engine.create_stream(cfg(partitions=2, max_age_s=3600.5, dedup_window_s=60))
    assert again.messages == 1, "same configuration: a no-op that keeps the data"
    before = snapshot(engine, "orders")
    for different in (
        cfg(partitions=3, max_age_s=3600.5, dedup_window_s=60),
        cfg(partitions=2, max_age_s=3600.5, dedup_window_s=61),
        cfg(subjects=("orders.x",), partitions=2, max_age_s=3600.5, dedup_window_s=60),
    ):
        with pytest.raises(StreamExistsError) as exc:
            await engine.create_stream(different)
        assert "'orders'" in str(exc.value)
    assert engine.stream_info("orders").config == config
    assert snapshot(engine, "orders") == before
    with pytest.raises(InvalidConfigError):
        await engine.create_stream({"name": "x"})  # type: ignore[arg-type]


async def test_unknown_stream(engine: Engine) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(StreamNotFoundError, match="'ghost'"):
        engine.stream_info("ghost")
    with pytest.raises(StreamNotFoundError):
        engine.fetch("ghost", 0, 0)
    with pytest.raises(StreamNotFoundError):
        engine.resolve("ghost", 0, StartAt.earliest())
    with pytest.raises(StreamNotFoundError):
        await read_all(engine, "ghost", 0)
    with pytest.raises(StreamNotFoundError):
        await engine.wait_for_data("ghost", 0, 0, timeout=0.01)
    with pytest.raises(StreamNotFoundError):
        await engine.delete_stream("ghost")
    with pytest.raises(StreamNotFoundError):
        await engine.purge_stream("ghost")
    assert engine.streams() == ["orders"]


async def test_message_size_limit_defaults_to_one_mib(engine: Engine) -> None:
    assert engine.max_message_bytes == MiB
    await engine.create_stream(cfg())
    ok = await engine.publish("orders.x", b"x" * (MiB - 1024))
    assert ok.offset == 0
    before = snapshot(engine, "orders")
    with pytest.raises(MessageTooLargeError) as info:
        await engine.publish("orders.x", b"x" * (MiB + 1))
    assert str(MiB) in str(info.value)
    with pytest.raises(MessageTooLargeError):
        await engine.publish("orders.x", b"x" * 10, headers={"big": "h" * MiB})
    with pytest.raises(MessageTooLargeError):
        await engine.publish_batch(
            [Message("orders.x", b"small"), Message("orders.x", b"x" * (2 * MiB)), Message("orders.x", b"s")]
        )
    assert snapshot(engine, "orders") == before, "a too-large message in a batch writes nothing"


async def test_message_size_limit_is_configurable(data_dir: Path) -> None:
    engine = await Engine.open(data_dir, max_message_bytes=500)
    try:
        assert engine.max_message_bytes == 500
        await engine.create_stream(cfg())
        await engine.publish("orders.x", b"x" * 400)
        with pytest.raises(MessageTooLargeError, match="500"):
            await engine.publish("orders.x", b"x" * 600)
        assert engine.stream_info("orders").messages == 1
    finally:
        await engine.close()


@pytest.mark.parametrize("limit", [0, -1, True, "1024", 1.5, 64 * MiB + 1])
async def test_invalid_message_size_limit(data_dir: Path, limit: Any) -> None:
    with pytest.raises(InvalidConfigError, match="max_message_bytes"):
        await Engine.open(data_dir, max_message_bytes=limit)
    # A refused open leaves the folder free.
    engine = await Engine.open(data_dir)
    await engine.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partitions", 0),
        ("partitions", -1),
        ("partitions", True),
        ("partitions", 1.5),
        ("partitions", "2"),
        ("partitions", 4097),
        ("durability", "sometimes"),
        ("durability", None),
        ("discard", "oldest"),
        ("max_bytes", -1),
        ("max_bytes", 0),
        ("max_bytes", True),
        ("max_msgs", 0),
        ("max_msgs", False),
        ("max_msgs", 10.0),
        ("max_msgs_per_subject", 0),
        ("max_age_s", 0),
        ("max_age_s", -5),
        ("max_age_s", "1"),
        ("max_age_s", True),
        ("dedup_window_s", -1),
        ("dedup_window_s", None),
        ("segment_bytes", 100),
        ("segment_bytes", True),
        ("segment_age_s", 0),
        ("fsync_interval_ms", 0),
    ],
)
async def test_invalid_config_values(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError) as info:
        StreamConfig("s", ("s.>",), **{field: value})
    message = str(info.value)
    assert field in message or repr(value) in message, message


async def test_bad_partition_numbers(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=2))
    for bad in (2, -1, True, "0", None, 1.0):
        with pytest.raises(InvalidConfigError, match="partitions 0 to 1"):
            engine.fetch("orders", bad, 0)  # type: ignore[arg-type]
        with pytest.raises(InvalidConfigError):
            engine.resolve("orders", bad, StartAt.earliest())  # type: ignore[arg-type]
        with pytest.raises(InvalidConfigError):
            await read_all(engine, "orders", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidConfigError):
            await engine.wait_for_data("orders", bad, 0, timeout=0.01)  # type: ignore[arg-type]


async def test_closed_engine_refuses_everything(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    await engine.publish("orders.x", b"1")
    await engine.close()
    await engine.close()  # idempotent
    with pytest.raises(EngineClosedError):
        await engine.publish("orders.x", b"2")
    with pytest.raises(EngineClosedError):
        await engine.publish_batch([Message("orders.x", b"2")])
    with pytest.raises(EngineClosedError):
        engine.fetch("orders", 0, 0)
    with pytest.raises(EngineClosedError):
        await engine.create_stream(cfg("other", ("other.>",)))
    with pytest.raises(EngineClosedError):
        engine.stream_info("orders")
    with pytest.raises(EngineClosedError):
        engine.streams()
    with pytest.raises(EngineClosedError):
        await read_all(engine, "orders", 0)
    with pytest.raises(EngineClosedError):
        await engine.wait_for_data("orders", 0, 5, timeout=0.01)
    with pytest.raises(EngineClosedError):
        engine.last_message("orders", "orders.x")
    with pytest.raises(EngineClosedError):
        engine.resolve("orders", 0, StartAt.latest())
    with pytest.raises(EngineClosedError):
        await engine.delete_stream("orders")
    with pytest.raises(EngineClosedError):
        await engine.purge_stream("orders")
    reopened = await Engine.open(data_dir)
    try:
        assert reopened.stream_info("orders").messages == 1
    finally:
        await reopened.close()


async def test_engine_closed_while_a_read_is_running(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(durability="never"))
    await engine.publish_batch([Message("orders.x", b"%d" % i) for i in range(5000)])
    count = 0
    with pytest.raises(EngineClosedError):
        async for _ in engine.read("orders", 0, batch=100):
            count += 1
            if count == 150:
                await engine.close()
    assert 150 <= count < 5000, "the read stops soon after the close instead of running on"


@pytest.mark.parametrize("payload", ["text", 123, None, ["b"], {"a": 1}])
async def test_non_bytes_payload(engine: Engine, payload: Any) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidMessageError, match="payload"):
        await engine.publish("orders.x", payload)
    with pytest.raises(InvalidMessageError, match="payload"):
        await engine.publish_batch([Message("orders.x", b"ok"), Message("orders.x", payload)])
    with pytest.raises(InvalidMessageError, match="payloads"):
        await engine.publish_many("orders.x", [b"ok", payload, b"ok"])
    assert engine.stream_info("orders").messages == 0


async def test_publish_many_takes_bytes_subclasses(engine: Engine) -> None:
    class Payload(bytes):
        pass

    await engine.create_stream(cfg())
    await engine.publish_many("orders.x", [b"a", Payload(b"b")])
    assert [m.payload for m in engine.fetch("orders", 0, 0)] == [b"a", b"b"]


@pytest.mark.parametrize(
    "headers",
    [{"a": 1}, {1: "a"}, {"": "empty name"}, {"a": b"bytes"}, {"a": None}, {"k": "v", "n": 2.5}],
)
async def test_invalid_headers(engine: Engine, headers: dict[Any, Any]) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidMessageError):
        await engine.publish("orders.x", b"x", headers=headers)
    with pytest.raises(InvalidMessageError):
        await engine.publish_batch([Message("orders.x", b"ok"), Message("orders.x", b"x", headers=headers)])
    assert engine.stream_info("orders").messages == 0


async def test_headers_that_are_not_a_mapping(engine: Engine) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidMessageError):
        await engine.publish("orders.x", b"x", headers=42)  # type: ignore[arg-type]
    assert engine.stream_info("orders").messages == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"key": 123},
        {"key": b"bytes-key"},
        {"key": "k" * 70_000},
        {"msg_id": 5},
        {"msg_id": ""},
        {"msg_id": "i" * 256},
        {"msg_id": b"id"},
    ],
    ids=["key-int", "key-bytes", "key-too-long", "id-int", "id-empty", "id-too-long", "id-bytes"],
)
async def test_invalid_key_or_id_via_publish(engine: Engine, fields: dict[str, Any]) -> None:
    await engine.create_stream(cfg(partitions=2))
    with pytest.raises(InvalidMessageError):
        await engine.publish("orders.x", b"x", **fields)
    assert engine.stream_info("orders").messages == 0


@pytest.mark.parametrize(
    "fields",
    [{"key": 123}, {"key": b"bytes-key"}, {"id": 5}],
    ids=["key-int", "key-bytes", "id-int"],
)
async def test_invalid_key_or_id_via_publish_batch(engine: Engine, fields: dict[str, Any]) -> None:
    await engine.create_stream(cfg(partitions=2))
    with pytest.raises(InvalidMessageError):
        await engine.publish_batch([Message("orders.x", b"x", **fields)])
    assert engine.stream_info("orders").messages == 0


async def test_too_long_key_or_id_via_publish_batch(engine: Engine) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidMessageError):
        await engine.publish_batch([Message("orders.x", b"x", key="k" * 70_000)])
    with pytest.raises(InvalidMessageError):
        await engine.publish_batch([Message("orders.x", b"x", id="i" * 256)])
    assert engine.stream_info("orders").messages == 0


# -- the folder lock -------------------------------------------------------------------------


async def run_lock_probe(data_dir: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_PROBE,
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_another_process_cannot_open_a_folder_in_use(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    out = await run_lock_probe(data_dir)
    lines = out.splitlines()
    assert lines[0] == f"LOCKED {os.getpid()}"
    assert str(os.getpid()) in lines[1]
    assert str(data_dir) in lines[1]
    await engine.close()

    out = await run_lock_probe(data_dir)
    assert out.splitlines() == ["OPENED orders"]
    engine = await Engine.open(data_dir)  # and it released it again
    await engine.close()


async def test_second_open_in_the_same_process_is_refused(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    try:
        with pytest.raises(DataDirLockedError) as info:
            await Engine.open(data_dir)
        assert info.value.pid == os.getpid()
    finally:
        await engine.close()


# -- close and reopen ------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["always", "interval", "never"])
async def test_everything_is_there_after_reopen(data_dir: Path, durability: str) -> None:
    config = cfg(partitions=3, durability=durability, segment_bytes=4096, max_age_s=86400.0)
    engine = await Engine.open(data_dir)
    await engine.create_stream(config)
    await engine.create_stream(cfg("audit", ("audit.>",)))
    for i in range(150):
        await engine.publish(
            f"orders.s{i % 5}",
            b"p%03d" % i + b"." * 50,
            key=None if i % 4 == 0 else f"k{i % 11}",
            headers={"n": str(i)} if i % 3 == 0 else None,
            msg_id=f"id-{i}" if i % 7 == 0 else None,
        )
    await engine.publish_batch([Message("orders.batch", b"b%d" % i) for i in range(20)])
    await engine.publish("audit.x", b"audit")
    before = await read_stream(engine, "orders")
    info_before = engine.stream_info("orders")
    last_before = engine.last_message("orders", "orders.s3")
    assert sum(p.segments for p in info_before.partitions) > 3
    await engine.close()

    engine = await Engine.open(data_dir)
    try:
        assert engine.streams() == ["audit", "orders"]
        assert engine.stream_info("orders").config == config
        await engine.create_stream(config)  # the same configuration is still a no-op
        after = await read_stream(engine, "orders")
        assert after.keys() == before.keys()
        for p in before:
            assert [
                (m.offset, m.subject, m.payload, m.key, m.headers, m.id, m.timestamp) for m in after[p]
            ] == [(m.offset, m.subject, m.payload, m.key, m.headers, m.id, m.timestamp) for m in before[p]]
        info_after = engine.stream_info("orders")
        assert [(p.first_offset, p.next_offset, p.messages, p.bytes) for p in info_after.partitions] == [
            (p.first_offset, p.next_offset, p.messages, p.bytes) for p in info_before.partitions
        ]
        last_after = engine.last_message("orders", "orders.s3")
        assert last_before is not None and last_after is not None
        assert (last_after.offset, last_after.partition, last_after.payload) == (
            last_before.offset,
            last_before.partition,
            last_before.payload,
        )
        # Offsets continue, and the per-subject state is intact for expectations.
        p = partition_for_key(b"k1", 3)
        ack = await engine.publish(
            "orders.s3",
            b"next",
            key="k1",
            expect=Expect(last_offset=info_before.partitions[p].next_offset - 1),
        )
        assert ack.offset == info_before.partitions[p].next_offset
        assert [m.payload for m in await read_all(engine, "audit", 0)] == [b"audit"]
    finally:
        await engine.close()


async def test_reopen_an_empty_stream(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(partitions=2))
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        info = engine.stream_info("orders")
        assert info.messages == 0
        assert [(p.first_offset, p.next_offset) for p in info.partitions] == [(0, 0), (0, 0)]
        assert (await engine.publish("orders.x", b"first", key="k")).offset == 0
    finally:
        await engine.close()


async def test_delete_stream_removes_files_and_frees_the_name(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(partitions=2))
    await engine.create_stream(cfg("keep", ("keep.>",)))
    for i in range(10):
        await engine.publish("orders.x", b"%d" % i)
    await engine.publish("keep.x", b"k")
    folder = data_dir / "streams" / "orders"
    assert folder.is_dir()
    await engine.delete_stream("orders")
    assert not folder.exists()
    assert engine.streams() == ["keep"]
    with pytest.raises(StreamNotFoundError):
        engine.stream_info("orders")
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish("orders.x", b"gone")

    # The name and the subjects can be reused, with another configuration.
    await engine.create_stream(cfg(subjects=("orders.new.>",), partitions=1))
    ack = await engine.publish("orders.new.x", b"fresh")
    assert (ack.stream, ack.offset) == ("orders", 0)
    assert [m.payload for m in await read_all(engine, "orders", 0)] == [b"fresh"]
    await engine.create_stream(cfg("others", ("orders.old.>",)))
    await engine.close()

    engine = await Engine.open(data_dir)
    try:
        assert engine.streams() == ["keep", "orders", "others"]
        assert engine.stream_info("orders").config.subjects == ("orders.new.>",)
        assert [m.payload for m in await read_all(engine, "orders", 0)] == [b"fresh"]
        assert [m.payload for m in await read_all(engine, "keep", 0)] == [b"k"]
    finally:
        await engine.close()


async def test_purge_stream_empties_but_offsets_continue(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=2, segment_bytes=4096))
    for i in range(100):
        await engine.publish("orders.x", b"%03d" % i + b"." * 60)
    next_offsets = [p.next_offset for p in engine.stream_info("orders").partitions]
    await engine.purge_stream("orders")
    info = engine.stream_info("orders")
    assert info.messages == 0
    assert info.bytes == 0
    for p, expected in zip(info.partitions, next_offsets, strict=True):
        assert (p.first_offset, p.next_offset) == (expected, expected)
        assert engine.fetch("orders", p.partition, 0) == []
        assert await read_all(engine, "orders", p.partition) == []
    assert engine.last_message("orders", "orders.x") is None
    acks = [await engine.publish("orders.x", b"after") for _ in range(2)]
    assert sorted((a.partition, a.offset) for a in acks) == [(0, next_offsets[0]), (1, next_offsets[1])]
    for a in acks:
        assert [m.offset for m in await read_all(engine, "orders", a.partition)] == [a.offset]


async def test_purged_stream_survives_reopen(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    for i in range(10):
        await engine.publish("orders.x", b"%d" % i)
    await engine.purge_stream("orders")
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        info = engine.stream_info("orders").partitions[0]
        assert (info.first_offset, info.next_offset, info.messages) == (10, 10, 0)
        assert (await engine.publish("orders.x", b"next")).offset == 10
    finally:
        await engine.close()


# -- concurrency -----------------------------------------------------------------------------


async def test_fifty_concurrent_publishers_with_group_commit(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(durability="always"))

    async def publisher(n: int) -> list[PubAck]:
        return [await engine.publish("orders.x", b"%d:%d" % (n, i)) for i in range(10)]

    results = await asyncio.gather(*(publisher(n) for n in range(50)))
    offsets = sorted(a.offset for acks in results for a in acks)
    assert offsets == list(range(500))
    by_offset = {m.offset: m.payload for m in await read_all(engine, "orders", 0)}
    for n, acks in enumerate(results):
        assert [by_offset[a.offset] for a in acks] == [b"%d:%d" % (n, i) for i in range(10)]
        assert [a.offset for a in acks] == sorted(a.offset for a in acks)
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert len(await read_all(engine, "orders", 0)) == 500
    finally:
        await engine.close()


async def test_concurrent_single_and_batch_publishers(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=2, durability="always"))

    async def single(n: int) -> None:
        for i in range(40):
            await engine.publish("orders.x", b"%d:%d" % (n, i), key=f"k{n}")

    async def batches(n: int) -> None:
        for i in range(20):
            await engine.publish_batch(
                [Message("orders.y", b"%d:%d:%d" % (n, i, j), key=f"b{j}") for j in range(4)]
            )

    await asyncio.gather(*(single(n) for n in range(10)), *(batches(n) for n in range(10)))
    by_partition = await read_stream(engine, "orders")
    assert sum(len(v) for v in by_partition.values()) == 400 + 800
    payloads = set()
    ids = set()
    for p, msgs in by_partition.items():
        assert [m.offset for m in msgs] == list(range(len(msgs)))
        for m in msgs:
            assert m.key is not None and partition_for_key(m.key.encode(), 2) == p
            payloads.add(m.payload)
            ids.add(m.id)
    assert len(ids) == 1200
    assert payloads == {b"%d:%d" % (n, i) for n in range(10) for i in range(40)} | {
        b"%d:%d:%d" % (n, i, j) for n in range(10) for i in range(20) for j in range(4)
    }
    # Id order under this interleaving is checked deterministically by
    # test_ids_increase_when_batches_and_single_publishes_interleave.


async def test_ids_increase_when_batches_and_single_publishes_interleave(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="never"))
    for r in range(20):
        tasks = [asyncio.create_task(engine.publish_batch([Message("orders.b", b"b%d" % r)]))]
        tasks += [asyncio.create_task(engine.publish("orders.x", b"%d" % i)) for i in range(200)]
        await asyncio.gather(*tasks)
    msgs = await read_all(engine, "orders", 0)
    assert len(msgs) == 20 * 201
    assert_strictly_increasing_ids(msgs)


async def test_readers_follow_concurrent_writers(engine: Engine) -> None:
    await engine.create_stream(cfg(durability="interval", segment_bytes=8192))
    writers, per_writer = 5, 300
    total = writers * per_writer

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await engine.publish("orders.x", b"%d:%04d" % (w, i) + b"." * 20)
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def reader() -> list[Message]:
        got: list[Message] = []
        offset = 0
        while len(got) < total:
            async for m in engine.read("orders", 0, StartAt.offset(offset), batch=50):
                got.append(m)
            offset = got[-1].offset + 1 if got else 0
            if len(got) < total:
                await engine.wait_for_data("orders", 0, offset, timeout=5)
        return got

    results = await asyncio.gather(reader(), reader(), *(writer(w) for w in range(writers)))
    final = await read_all(engine, "orders", 0)
    assert len(final) == total
    for got in results[:2]:
        assert isinstance(got, list)
        assert [m.offset for m in got] == list(range(total))
        assert [m.payload for m in got] == [m.payload for m in final]
    for w in range(writers):
        mine = [m.payload for m in final if m.payload.startswith(b"%d:" % w)]
        assert mine == [b"%d:%04d" % (w, i) + b"." * 20 for i in range(per_writer)]


# -- publish_many (bulk path) ----------------------------------------------------------------


@needs_publish_many
async def test_publish_many_round_trip(engine: Engine) -> None:
    await engine.create_stream(cfg())
    await engine.publish("orders.x", b"before")
    payloads = [b"%05d" % i for i in range(1000)] + [b""]
    acks = await engine.publish_many("orders.bulk", payloads)
    assert len(acks) == len(payloads)
    assert [a.offset for a in acks] == list(range(1, len(payloads) + 1))
    assert {a.partition for a in acks} == {0}
    assert not any(a.duplicate for a in acks)
    assert acks[-1] == PubAck("orders", 0, len(payloads), False)
    await engine.publish("orders.x", b"after")
    msgs = await read_all(engine, "orders", 0)
    assert [m.payload for m in msgs] == [b"before", *payloads, b"after"]
    assert all(m.subject == "orders.bulk" for m in msgs[1:-1])
    assert all(m.key is None and m.headers == {} and not m.has_explicit_id for m in msgs[1:-1])
    for m in msgs:
        assert_uuid7(m.id)
    assert_strictly_increasing_ids(msgs)
    assert [m.offset for m in await read_all(engine, "orders", 0, StartAt.offset(500))][:2] == [500, 501]
    last = engine.last_message("orders", "orders.bulk")
    assert last is not None and last.offset == len(payloads)


@needs_publish_many
async def test_publish_many_partitioning(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=4))
    acks = await engine.publish_many("orders.x", [b"a", b"b", b"c"], key="customer-9")
    assert {a.partition for a in acks} == {partition_for_key(b"customer-9", 4)}
    used = []
    for _ in range(8):
        acks = await engine.publish_many("orders.x", [b"1", b"2"])
        assert len({a.partition for a in acks}) == 1
        used.append(acks[0].partition)
    assert Counter(used) == {0: 2, 1: 2, 2: 2, 3: 2}


@needs_publish_many
async def test_publish_many_with_headers(engine: Engine) -> None:
    assert "headers" in inspect.signature(Engine.publish_many).parameters
    await engine.create_stream(cfg())
    await engine.publish_many("orders.x", [b"1", b"2"], key="k", headers={"h": "v"})  # type: ignore[call-arg]
    msgs = await read_all(engine, "orders", 0)
    assert [(m.payload, m.key, m.headers) for m in msgs] == [(b"1", "k", {"h": "v"}), (b"2", "k", {"h": "v"})]


@needs_publish_many
async def test_publish_many_bad_input(engine: Engine) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidSubjectError):
        await engine.publish_many("orders.*", [b"x"])
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish_many("payments.x", [b"x"])
    with pytest.raises(MessageTooLargeError):
        await engine.publish_many("orders.x", [b"ok", b"x" * (MiB + 1)])
    with pytest.raises(InvalidMessageError):
        await engine.publish_many("orders.x", [b"ok"], key=7)  # type: ignore[arg-type]
    assert engine.stream_info("orders").messages == 0


@needs_publish_many
async def test_publish_many_non_bytes_payload(engine: Engine) -> None:
    await engine.create_stream(cfg())
    with pytest.raises(InvalidMessageError, match="payload"):
        await engine.publish_many("orders.x", [b"ok", "text"])  # type: ignore[list-item]
    assert engine.stream_info("orders").messages == 0


@needs_publish_many
async def test_publish_many_on_a_closed_engine(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg())
    await engine.publish_many("orders.x", [b"%d" % i for i in range(100)])
    await engine.close()
    with pytest.raises(EngineClosedError):
        await engine.publish_many("orders.x", [b"x"])
    engine = await Engine.open(data_dir)
    try:
        assert [m.payload for m in await read_all(engine, "orders", 0)] == [b"%d" % i for i in range(100)]
    finally:
        await engine.close()


# -- update_stream -----------------------------------------------------------------------------


async def test_update_stream_moves_subjects_changes_limits_and_persists(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(StreamConfig("orders", ("orders.a",), partitions=2, dedup_window_s=60))
    await engine.create_stream(StreamConfig("other", ("other.>",)))
    await engine.publish("orders.a", b"1", msg_id="m1")
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish("orders.b", b"2")
    updated = StreamConfig("orders", ("orders.b",), partitions=2, max_msgs=100, dedup_window_s=1)
    await engine.update_stream(updated)
    assert (await engine.publish("orders.b", b"2")).stream == "orders"
    with pytest.raises(NoStreamForSubjectError):
        await engine.publish("orders.a", b"3")
    with pytest.raises(SubjectOverlapError):
        await engine.update_stream(StreamConfig("orders", ("other.x",), partitions=2))
    for fixed in ({"partitions": 3}, {"durability": "always"}, {"segment_bytes": 4096}):
        with pytest.raises(InvalidConfigError, match="cannot be changed"):
            await engine.update_stream(StreamConfig("orders", ("orders.b",), **{"partitions": 2, **fixed}))
    with pytest.raises(StreamNotFoundError):
        await engine.update_stream(StreamConfig("missing", ("m.>",)))
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert engine.stream_info("orders").config == updated
        assert (await engine.publish("orders.b", b"4")).stream == "orders"
        assert engine.stream_info("orders").messages == 3
    finally:
        await engine.close()
