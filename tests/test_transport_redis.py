"""The Redis transport beyond the conformance suite: offsets, dedup, retention, leases, ordered
groups' rebalancing and failures, queue groups, and the refusals."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

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
    NoRespondersError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from pigeon.message import Headers
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec, Transport
from pigeon.transport.redis import RedisOptions, RedisTransport

FAST = RedisOptions(claim_interval_s=0.1, session_timeout_s=1.0, heartbeat_interval_s=0.2)


@pytest.fixture
async def url() -> str:
    return require_service("redis")


class Env:
    """A transport plus the streams a test created (deleted at the end)."""

    def __init__(self, transport: RedisTransport) -> None:
        self.t = transport
        self.created: list[str] = []

    async def stream(self, partitions: int = 1, **limits: Any) -> tuple[str, str]:
        name = unique_name("rs")
        prefix = name.replace("-", "_")
        await self.t.create_stream(StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits))
        self.created.append(name)
        return name, prefix


@pytest.fixture
async def env(url: str) -> AsyncIterator[Env]:
    transport = await connect(url, FAST)
    assert isinstance(transport, RedisTransport)
    env = Env(transport)
    try:
        yield env
    finally:
        for name in env.created:
            with contextlib.suppress(StreamNotFoundError):
                await transport.delete_stream(name)
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


def test_the_redis_name_resolves_to_the_client_library() -> None:
    import redis.asyncio

    assert "site-packages" in (redis.asyncio.__file__ or "")
    assert RedisTransport.__module__.startswith("pigeon.transport.redis")


def test_options_are_checked() -> None:
    with pytest.raises(InvalidConfigError):
        RedisOptions(claim_interval_s=0)
    with pytest.raises(InvalidConfigError):
        RedisOptions(session_timeout_s=1.0, heartbeat_interval_s=0.8)
    with pytest.raises(InvalidConfigError):
        RedisOptions(prefix="has space")


async def test_open_refuses_bad_options_and_unreachable_servers(url: str) -> None:
    with pytest.raises(InvalidConfigError):
        await connect(url, object())
    with pytest.raises(TransportClosedError):
        await connect("redis://127.0.0.1:1/0", RedisOptions(connect_timeout_s=0.5))


async def test_closed_transport_refuses_work(url: str) -> None:
    transport = await connect(url)
    await transport.close()
    await transport.close()  # twice is fine
    with pytest.raises(TransportClosedError):
        await transport.publish("x.y", b"")
    with pytest.raises(TransportClosedError):
        await transport.subscribe("x.y")


async def test_bad_messages_raise_pigeon_errors(env: Env) -> None:
    _, prefix = await env.stream()
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", headers={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", b"", key=5)  # type: ignore[arg-type]


# -- streams -------------------------------------------------------------------------------------


async def test_offsets_are_dense_per_partition_and_keys_route_like_the_engine(env: Env) -> None:
    stream, prefix = await env.stream(partitions=3)
    acks = [await env.t.publish(f"{prefix}.k", b"", key=f"key{i}") for i in range(30)]
    by_partition: dict[int, list[int]] = {}
    for i, ack in enumerate(acks):
        assert ack is not None
        assert ack.partition == partition_for_key(f"key{i}".encode(), 3)
        by_partition.setdefault(ack.partition, []).append(ack.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    unkeyed = [await env.t.publish(f"{prefix}.u", b"") for _ in range(6)]
    assert sorted(a.partition for a in unkeyed if a) == [0, 0, 1, 1, 2, 2]
    state = await env.t.stream_state(stream)
    assert state.messages == 36
    assert sum(o + 1 for o in state.last_offsets) == 36


async def test_stored_messages_keep_every_field(env: Env) -> None:
    stream, prefix = await env.stream()
    await env.t.publish(f"{prefix}.a", b"\x00\xffbytes", key="k", headers={"h": "v", "e": ""}, msg_id="m-1")
    await env.t.publish(f"{prefix}.b", b"plain")
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    first, second = await drain(consumer, 2)
    assert (first.message.subject, first.message.payload, first.message.key) == (
        f"{prefix}.a",
        b"\x00\xffbytes",
        "k",
    )
    assert first.message.headers == {"h": "v", "e": ""}
    assert first.message.id == "m-1" and first.message.has_explicit_id
    assert (first.partition, first.offset, first.message.stream) == (0, 0, stream)
    assert not second.message.has_explicit_id and len(second.message.id) == 36
    assert abs(second.message.timestamp - time.time()) < 5
    await consumer.close()


async def test_dedup_returns_the_original_position_across_partitions_and_expires(env: Env) -> None:
    _, prefix = await env.stream(partitions=4, dedup_window_s=0.3)
    first = await env.t.publish(f"{prefix}.x", b"1", key="a", msg_id="same")
    again = await env.t.publish(f"{prefix}.x", b"1", key="b", msg_id="same")
    assert first is not None and again is not None and again.duplicate
    assert (again.partition, again.offset) == (first.partition, first.offset)
    await asyncio.sleep(0.5)
    later = await env.t.publish(f"{prefix}.x", b"1", key="a", msg_id="same")
    assert later is not None and not later.duplicate and later.offset == first.offset + 1


async def test_duplicates_do_not_reach_core_subscribers(env: Env) -> None:
    _, prefix = await env.stream()
    watcher = await env.t.subscribe(f"{prefix}.>")
    await env.t.publish(f"{prefix}.x", b"once", msg_id="d1")
    await env.t.publish(f"{prefix}.x", b"once", msg_id="d1")
    assert (await watcher.next(2)).payload == b"once"
    with pytest.raises(TimeoutError):
        await watcher.next(0.3)
    await watcher.unsubscribe()


async def test_stream_lifecycle_errors(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    await env.t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=2))  # the same: no-op
    with pytest.raises(StreamExistsError):
        await env.t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=3))
    with pytest.raises(SubjectOverlapError):
        await env.t.create_stream(StreamSpec(unique_name("o"), (f"{prefix}.x",)))
    with pytest.raises(UnsupportedFeatureError):
        await env.t.create_stream(StreamSpec(unique_name("b"), (f"{unique_name('b')}.x",), max_bytes=1000))
    with pytest.raises(StreamNotFoundError):
        await env.t.stream_state(unique_name("missing"))
    with pytest.raises(StreamNotFoundError):
        await env.t.consumer(unique_name("missing"), ConsumerSpec("g"))


async def test_another_transport_sees_new_and_deleted_streams_at_once(env: Env, url: str) -> None:
    other = await connect(url)
    try:
        assert await other.publish(f"{unique_name('w').replace('-', '_')}.warm", b"") is None
        stream, prefix = await env.stream()  # created after `other` loaded the registry
        ack = await other.publish(f"{prefix}.x", b"routed")
        assert ack is not None and ack.stream == stream
        await env.t.delete_stream(stream)
        env.created.remove(stream)
        assert await other.publish(f"{prefix}.x", b"core only") is None
    finally:
        await other.close()


async def test_delete_stream_removes_every_key(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    group = unique_name("g")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, max_deliver=1))
    await env.t.publish(f"{prefix}.x", b"bad", msg_id="dd")
    (received,) = await consumer.fetch(1, 5)
    await received.nack(error="boom")
    assert len(await env.t.read_dead_letters(stream, group)) == 1
    await consumer.close()
    await env.t.delete_stream(stream)
    env.created.remove(stream)
    left = [k async for k in env.t.client.scan_iter(match=f"pigeon:*{stream}*")]
    assert left == []
    with pytest.raises(StreamNotFoundError):
        await env.t.delete_stream(stream)


async def test_purge_empties_every_partition_and_drops_what_groups_held(env: Env) -> None:
    t = env.t
    stream, prefix = await env.stream(partitions=2)
    group = unique_name("g")
    shared = await t.consumer(stream, ConsumerSpec(group, ack_wait_s=0.5))
    ordered = await t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered", ack_wait_s=10))
    for i in range(8):
        await t.publish(f"{prefix}.old", f"old{i}".encode(), key=f"k{i}")
    held = await drain(shared, 4, ack=False)
    await held[0].nack(delay=0.2)  # waits in the delayed set when the purge comes
    batch = await ordered.fetch(10, 5)
    await t.purge_stream(stream)
    assert [await t.client.xlen(t.keys.partition(stream, p)) for p in range(2)] == [0, 0]
    assert not await t.client.exists(t.keys.delayed(stream, group))
    await held[1].ack()  # a delivery held across the purge can still be settled
    for delivery in batch[1:]:
        if delivery.partition != batch[0].partition:
            await delivery.ack()  # settled across the purge: the partition's next batch may come
    await batch[0].nack()  # an ordered rewind to a purged message moves on to what is left
    for i in range(4):
        await t.publish(f"{prefix}.new", f"new{i}".encode(), key=f"k{i}")
    new = sorted(f"new{i}".encode() for i in range(4))
    # Longer than ack_wait and the nack's delay: neither brings a purged message back.
    assert sorted(r.message.payload for r in await drain(shared, 5, timeout=1.5)) == new
    assert sorted(r.message.payload for r in await drain(ordered, 5, timeout=1.5)) == new
    lag = await t.lag(stream, group)
    assert [(p.lag, p.in_flight, p.waiting) for p in lag] == [(0, 0, 0), (0, 0, 0)]
    assert [p.head for p in lag] == [o + 1 for o in (await t.stream_state(stream)).last_offsets]
    await shared.close()
    await ordered.close()


async def test_list_streams_names_the_registry_of_its_own_prefix(env: Env, url: str) -> None:
    stream, _ = await env.stream(partitions=3)
    other = await connect(url, RedisOptions(prefix=unique_name("other")))
    try:
        theirs = unique_name("rs")
        await other.create_stream(StreamSpec(theirs, (f"{theirs.replace('-', '_')}.>",)))
        listed = await env.t.list_streams()
        assert stream in listed and theirs not in listed and listed == sorted(listed)
        assert await other.list_streams() == [theirs]
        await other.delete_stream(theirs)
        assert await other.list_streams() == []
    finally:
        await other.close()
    with pytest.raises(StreamNotFoundError):
        await env.t.purge_stream(unique_name("missing"))


async def test_retention_by_count_and_age(url: str) -> None:
    transport = await connect(url, RedisOptions(exact_trim=True))
    env = Env(transport)  # type: ignore[arg-type]
    try:
        counted, prefix = await env.stream(partitions=2, max_msgs=10)
        for i in range(40):
            await transport.publish(f"{prefix}.x", str(i).encode())
        state = await transport.stream_state(counted)
        assert state.messages == 10 and state.last_offsets == (19, 19)
        aged, prefix = await env.stream(max_age_s=0.3)
        for i in range(5):
            await transport.publish(f"{prefix}.x", str(i).encode())
        await asyncio.sleep(0.5)
        assert (await transport.stream_state(aged)).messages == 0
    finally:
        for name in env.created:
            await transport.delete_stream(name)
        await transport.close()


async def test_start_at_an_offset_and_at_the_latest(env: Env) -> None:
    stream, prefix = await env.stream()
    for i in range(50):
        await env.t.publish(f"{prefix}.x", str(i).encode())
        if i % 10 == 0:
            await asyncio.sleep(0.002)  # spread the entries over several milliseconds
    for start in (0, 1, 17, 49):
        consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), start=StartAt.offset(start)))
        got = await drain(consumer, 50 - start)
        assert [r.offset for r in got] == list(range(start, 50))
        await consumer.close()
    latest = await env.t.consumer(stream, ConsumerSpec(unique_name("l"), start=StartAt.latest()))
    assert await latest.fetch(5, 0.3) == []
    await env.t.publish(f"{prefix}.x", b"new")
    assert [r.message.payload for r in await drain(latest, 1)] == [b"new"]
    await latest.close()


async def test_publish_batch_keeps_order_and_dedups(env: Env) -> None:
    from pigeon.message import Message

    stream, prefix = await env.stream()
    messages = [Message(f"{prefix}.x", str(i).encode()) for i in range(20)]
    messages.append(Message(f"{prefix}.x", b"dup", id="b-1"))
    messages.append(Message(f"{prefix}.x", b"dup", id="b-1"))
    messages.append(Message(f"{unique_name('free').replace('-', '_')}.x", b"core"))
    acks = await env.t.publish_batch(messages)
    assert [a.offset for a in acks[:21] if a] == list(range(21))
    assert acks[21] is not None and acks[21].duplicate and acks[21].offset == 20
    assert acks[22] is None
    assert (await env.t.stream_state(stream)).messages == 21


# -- shared groups -------------------------------------------------------------------------------


async def test_group_specs_must_match_and_key_ordered_is_refused(env: Env) -> None:
    stream, _ = await env.stream()
    group = unique_name("g")
    first = await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=5))
    with pytest.raises(GroupExistsError):
        await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=6))
    with pytest.raises(UnsupportedFeatureError):
        await env.t.consumer(stream, ConsumerSpec(unique_name("k"), key_ordered=True))
    await first.close()
    await env.t.delete_group(stream, group)
    with pytest.raises(GroupNotFoundError):
        await env.t.lag(stream, group)
    with pytest.raises(GroupNotFoundError):
        await env.t.delete_group(stream, group)


async def test_a_lost_lease_cannot_be_settled_and_settling_twice_fails(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.3)
    slow, fast = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"job")
    (held,) = await slow.fetch(1, 5)
    (taken,) = await drain(fast, 1, ack=False)
    assert taken.delivery_count == 2
    with pytest.raises(DeliveryNotOwnedError):
        await held.ack()
    await taken.ack()
    with pytest.raises(AlreadySettledError):
        await taken.ack()
    await slow.close()
    await fast.close()


async def test_in_progress_keeps_the_lease(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.5)
    worker, rival = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"long job")
    (received,) = await worker.fetch(1, 5)
    for _ in range(4):
        await asyncio.sleep(0.3)
        await received.in_progress()
        assert await rival.fetch(1, 0) == []
    await received.ack()
    await worker.close()
    await rival.close()


async def test_max_ack_pending_bounds_unsettled_messages(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g"), max_ack_pending=3))
    for i in range(10):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    got = await consumer.fetch(10, 1)
    assert len(got) == 3
    assert await consumer.fetch(10, 0.3) == []
    await got[0].ack()
    assert len(await consumer.fetch(10, 1)) == 1
    await consumer.close()


async def test_a_delayed_nack_is_not_taken_early_by_another_member(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.2)
    first, second = await env.t.consumer(stream, spec), await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"later")
    (received,) = await first.fetch(1, 5)
    nacked_at = time.monotonic()
    await received.nack(delay=0.8)
    assert await second.fetch(1, 0.5) == []
    lag = await env.t.lag(stream, spec.group)
    assert (lag[0].lag, lag[0].waiting) == (1, 1)
    (again,) = await drain(second, 1, ack=False)
    assert time.monotonic() - nacked_at >= 0.8
    assert again.delivery_count == 2
    await again.ack()
    await first.close()
    await second.close()


async def test_term_and_expired_last_delivery_go_to_dead_letters(env: Env) -> None:
    stream, prefix = await env.stream()
    group = unique_name("g")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=0.3, max_deliver=1))
    await env.t.publish(f"{prefix}.term", b"t", msg_id="to-term")
    await env.t.publish(f"{prefix}.slow", b"s")
    got = await consumer.fetch(2, 5)
    by_subject = {r.message.subject: r for r in got}
    await by_subject[f"{prefix}.term"].term("not for us")
    # the other one is never settled: its lease expires on its last allowed delivery
    assert await consumer.fetch(1, 1.0) == []
    letters = await env.t.read_dead_letters(stream, group)
    assert sorted(m.subject for m in letters) == [f"$DLQ.{stream}.{group}"] * 2
    reasons = {m.headers[Headers.ORIGINAL_SUBJECT]: m.headers[Headers.ERROR_MESSAGE] for m in letters}
    assert reasons[f"{prefix}.term"] == "not for us"
    assert "ack_wait" in reasons[f"{prefix}.slow"]
    term_letter = next(m for m in letters if m.headers[Headers.ORIGINAL_SUBJECT] == f"{prefix}.term")
    assert term_letter.headers[Headers.ORIGINAL_MSG_ID] == "to-term"
    assert term_letter.headers[Headers.DELIVERY_COUNT] == "1"
    assert all(p.lag == 0 for p in await env.t.lag(stream, group))
    await consumer.close()


async def test_backoff_applies_to_nacks_without_a_delay(env: Env) -> None:
    from pigeon.engine.groups.config import Backoff

    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), backoff=Backoff(delays_s=(0.5,)))
    consumer = await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"x")
    (received,) = await consumer.fetch(1, 5)
    started = time.monotonic()
    await received.nack()
    (again,) = await drain(consumer, 1)
    assert time.monotonic() - started >= 0.5
    assert again.delivery_count == 2
    await consumer.close()


# -- ordered groups ------------------------------------------------------------------------------


async def test_ordered_nack_rewinds_to_the_nacked_message(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    for i in range(5):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    batch = await consumer.fetch(4, 5)
    assert [r.offset for r in batch] == [0, 1, 2, 3]
    await batch[0].ack()
    await batch[2].ack()  # acked, but after the nacked one: delivered again
    started = time.monotonic()
    await batch[1].nack(delay=0.4, error="retry")
    with pytest.raises(DeliveryNotOwnedError):
        await batch[3].ack()  # the rewind took it back
    again = await consumer.fetch(10, 5)
    assert time.monotonic() - started >= 0.4
    assert [(r.offset, r.delivery_count) for r in again] == [(1, 2), (2, 1), (3, 1), (4, 1)]
    for received in again:
        await received.ack()
    assert (await env.t.lag(stream, consumer.ctx.spec.group))[0].lag == 0  # type: ignore[attr-defined]
    await consumer.close()


async def test_ordered_max_deliver_and_term_dead_letter_and_move_on(env: Env) -> None:
    stream, prefix = await env.stream()
    group = unique_name("o")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind="ordered", max_deliver=2))
    for i in range(3):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    (first, *_) = await consumer.fetch(1, 5)
    await first.nack(error=ValueError("one"))
    (first,) = await consumer.fetch(1, 5)
    assert first.delivery_count == 2
    await first.nack(error=ValueError("two"))  # the last allowed delivery: dead letter
    second, third = await consumer.fetch(5, 5)
    assert [second.offset, third.offset] == [1, 2]
    await second.term("skip")
    await third.ack()
    letters = await env.t.read_dead_letters(stream, group)
    assert [m.headers[Headers.ORIGINAL_OFFSET] for m in letters] == ["0", "1"]
    assert letters[0].headers[Headers.ERROR_MESSAGE] == "two"
    assert await consumer.fetch(5, 0.3) == []
    await consumer.close()


async def test_ordered_partitions_move_when_members_join_and_leave(url: str) -> None:
    transport = await connect(url, FAST)
    env = Env(transport)  # type: ignore[arg-type]
    try:
        stream, prefix = await env.stream(partitions=2)
        spec = ConsumerSpec(unique_name("o"), kind="ordered")
        alone = await transport.consumer(stream, spec)
        for i in range(10):
            await transport.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
        got = await drain(alone, 10)
        assert {r.partition for r in got} == {0, 1}
        joined = await transport.consumer(stream, spec)
        for i in range(10, 40):
            await transport.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
        seen: dict[int, set[int]] = {0: set(), 1: set()}

        async def work(consumer: Any, index: int) -> None:
            deadline = time.monotonic() + 10
            while sum(map(len, seen.values())) < 30 and time.monotonic() < deadline:
                for received in await consumer.fetch(5, 0.2):
                    seen[index].add(received.partition)
                    await received.ack()

        await asyncio.gather(work(alone, 0), work(joined, 1))
        assert seen[0] and seen[1] and not seen[0] & seen[1], seen
        lag = await transport.lag(stream, spec.group)
        assert all(p.lag == 0 and p.owner for p in lag)
        await alone.close()  # its partition moves to the other member
        for i in range(40, 50):
            await transport.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
        assert len(await drain(joined, 10)) == 10
        await joined.close()
    finally:
        for name in env.created:
            await transport.delete_stream(name)
        await transport.close()


async def test_a_crashed_ordered_member_is_replaced_in_order(url: str) -> None:
    transport = await connect(url, FAST)
    env = Env(transport)  # type: ignore[arg-type]
    try:
        stream, prefix = await env.stream()
        spec = ConsumerSpec(unique_name("o"), kind="ordered")
        crashed = await transport.consumer(stream, spec)
        for i in range(6):
            await transport.publish(f"{prefix}.x", str(i).encode())
        batch = await crashed.fetch(3, 5)
        await batch[0].ack()  # not committed: the batch is not done
        # Crash: no more heartbeats, nothing released.
        crashed._heartbeats.cancel()  # type: ignore[attr-defined]
        crashed.closed = True  # type: ignore[attr-defined]
        successor = await transport.consumer(stream, spec)
        started = time.monotonic()
        got = await drain(successor, 6, timeout=10)
        assert time.monotonic() - started >= 0.5, "the lock outlives the crash by the session timeout"
        assert [r.offset for r in got] == [0, 1, 2, 3, 4, 5]
        assert [r.delivery_count for r in got[:3]] == [2, 1, 1]
        await successor.close()
    finally:
        for name in env.created:
            await transport.delete_stream(name)
        await transport.close()


async def test_ordered_heartbeats_stop_when_the_group_is_deleted(env: Env) -> None:
    stream, _ = await env.stream()
    group = unique_name("o")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind="ordered"))
    await consumer.fetch(1, 0.1)
    await env.t.delete_group(stream, group)
    await asyncio.sleep(0.5)  # a couple of heartbeats
    assert not await env.t.client.exists(env.t.keys.members(stream, group))
    with pytest.raises(GroupNotFoundError):
        await consumer.fetch(1, 0.1)
    await consumer.close()


# -- core messaging ------------------------------------------------------------------------------


async def test_wildcards_filter_what_the_glob_over_matches(env: Env) -> None:
    base = unique_name("w").replace("-", "_")
    star = await env.t.subscribe(f"{base}.*")
    odd = await env.t.subscribe(f"{base}.a?[b].*")  # glob characters are literal in subjects
    await env.t.publish(f"{base}.x.y", b"too deep")
    await env.t.publish(f"{base}.aXb.z", b"not literal")
    await env.t.publish(f"{base}.a?[b].z", b"literal")
    await env.t.publish(f"{base}.x", b"one token")
    assert (await star.next(2)).payload == b"one token"
    assert (await odd.next(2)).payload == b"literal"
    with pytest.raises(TimeoutError):
        await star.next(0.2)
    with pytest.raises(TimeoutError):
        await odd.next(0.2)
    await star.unsubscribe()
    await odd.unsubscribe()
    with pytest.raises(TransportClosedError):
        await star.next(0.1)


async def test_queue_groups_span_transports_and_forget_dead_members(env: Env, url: str) -> None:
    subject = f"{unique_name('q').replace('-', '_')}.work"
    other = await connect(url)
    try:
        mine = await env.t.subscribe(subject, queue="workers")
        theirs = await other.subscribe(subject, queue="workers")
        plain = await env.t.subscribe(subject)
        for i in range(40):
            await env.t.publish(subject, str(i).encode())
        counts = []
        for member in (mine, theirs):
            n = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await member.next(0.3)
                    n += 1
            counts.append(n)
        assert sum(counts) == 40 and all(counts), counts
        assert len([await plain.next(1) for _ in range(40)]) == 40
        await other.close()
        # A member that died without a word: registered, but nobody listens on its channel.
        await env.t.client.hset(env.t.keys.queues, "dead-member", f"workers\n{subject}")
        for i in range(30):  # the dead member is tried first half the time, then forgotten
            await env.t.publish(subject, str(i).encode())
        assert len([await mine.next(1) for _ in range(30)]) == 30
        assert not await env.t.client.hexists(env.t.keys.queues, "dead-member")
    finally:
        await other.close()


async def test_requests_reach_queue_members_and_carry_the_reply_subject(env: Env) -> None:
    subject = f"{unique_name('svc').replace('-', '_')}.add"
    service = await env.t.subscribe(subject, queue="adders")

    async def serve() -> None:
        request = await service.next(5)
        assert request.headers[Headers.REPLY_TO].startswith("_INBOX.")
        a, b = request.payload.split(b"+")
        await env.t.reply(request, str(int(a) + int(b)).encode())

    task = asyncio.create_task(serve())
    assert (await env.t.request(subject, b"2+3", timeout=5)).payload == b"5"
    await task
    await service.unsubscribe()
    with pytest.raises(NoRespondersError):
        await env.t.request(subject, b"1+1", timeout=5)
    with pytest.raises(InvalidConfigError):
        await env.t.request(subject, b"", timeout=0)


async def test_close_releases_subscriptions_and_members(url: str) -> None:
    transport: Transport = await connect(url)
    subscription = await transport.subscribe(f"{unique_name('c').replace('-', '_')}.x", queue="q")
    member = subscription.member  # type: ignore[attr-defined]
    await transport.close()
    with pytest.raises(TransportClosedError):
        await subscription.next(0.1)
    checker = await connect(url)
    try:
        assert not await checker.client.hexists(checker.keys.queues, member)  # type: ignore[attr-defined]
    finally:
        await checker.close()
