"""The NATS transport's own behaviours (the shared ones are in the conformance suite).

Every test uses fresh names and deletes the streams it made, which takes their groups,
dead-letter streams and coordination buckets with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pigeon.engine.config import StartAt
from pigeon.engine.groups.config import Backoff
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import (
    AlreadySettledError,
    DeliveryNotOwnedError,
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidSubjectError,
    MemberNotFoundError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from pigeon.message import Headers, Message
from pigeon.testing.conformance import drain, drain_all
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, Received, StreamSpec
from pigeon.transport.nats import NatsOptions, NatsTransport

FAST = NatsOptions(session_timeout_s=1.5, heartbeat_interval_s=0.3)


class Streams:
    """Makes streams with fresh names and deletes them at the end."""

    def __init__(self, transport: NatsTransport) -> None:
        self.transport = transport
        self.names: list[str] = []

    async def make(self, partitions: int = 1, **limits: Any) -> tuple[str, str]:
        name = unique_name("nt")
        prefix = name.replace("-", "_")
        await self.transport.create_stream(
            StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits)
        )
        self.names.append(name)
        return name, prefix


async def open_nats(options: NatsOptions | None = None) -> NatsTransport:
    transport = await connect(require_service("nats"), options)
    assert isinstance(transport, NatsTransport)
    return transport


@pytest.fixture
async def nats_transport() -> AsyncIterator[NatsTransport]:
    transport = await open_nats(FAST)
    yield transport
    await transport.close()


@pytest.fixture
async def streams(nats_transport: NatsTransport) -> AsyncIterator[Streams]:
    made = Streams(nats_transport)
    yield made
    cleaner = await open_nats()
    try:
        for name in made.names:
            with contextlib.suppress(StreamNotFoundError):
                await cleaner.delete_stream(name)
    finally:
        await cleaner.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


def payloads(received: list[Received]) -> list[bytes]:
    return [r.message.payload for r in received]


# -- connecting ---------------------------------------------------------------------------------


async def test_options_are_checked_and_an_unreachable_server_is_a_pigeon_error() -> None:
    with pytest.raises(InvalidConfigError):
        NatsOptions(session_timeout_s=1.0, heartbeat_interval_s=0.5)
    with pytest.raises(InvalidConfigError):
        NatsOptions(storage="tape")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        await connect("nats://127.0.0.1:4222", object())
    with pytest.raises(TransportClosedError):
        await connect("nats://127.0.0.1:1", NatsOptions(connect_timeout_s=0.5))


async def test_a_closed_transport_refuses_everything(nats_transport: NatsTransport) -> None:
    await nats_transport.close()
    with pytest.raises(TransportClosedError):
        await nats_transport.publish("anything.at.all", b"x")
    with pytest.raises(TransportClosedError):
        await nats_transport.subscribe("anything.>")
    await nats_transport.close()  # twice is fine


# -- publishing and streams ---------------------------------------------------------------------


async def test_partitioned_streams_route_keys_like_every_transport(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    t = nats_transport
    stream, prefix = await streams.make(partitions=3)
    watcher = await t.subscribe(f"{prefix}.>")
    everything = await t.subscribe(">")
    await asyncio.sleep(0.1)
    keys = [f"customer-{i}" for i in range(12)]
    acks = [await t.publish(f"{prefix}.order", k.encode(), key=k) for k in keys]
    for key, ack in zip(keys, acks, strict=True):
        assert ack is not None and ack.stream == stream and not ack.duplicate
        assert ack.partition == partition_for_key(key.encode(), 3)
    for p in range(3):  # offsets are dense per partition
        assert sorted(a.offset for a in acks if a and a.partition == p) == list(
            range(sum(1 for a in acks if a and a.partition == p))
        )
    # Core subscribers get each message once, on its own subject, with its key; pigeon's
    # partitioned copies ($PGN...) stay out of sight.
    core = [await watcher.next(5) for _ in keys]
    assert [m.key for m in core] == keys and {m.subject for m in core} == {f"{prefix}.order"}
    seen = []
    while True:
        try:
            seen.append(await everything.next(0.3))
        except TimeoutError:
            break
    assert [m.payload for m in seen if m.subject == f"{prefix}.order"] == [k.encode() for k in keys]
    assert not [m for m in seen if m.subject.startswith(("$", "_INBOX."))]
    state = await t.stream_state(stream)
    assert state.partitions == 3 and state.messages == 12
    assert sum(o + 1 for o in state.last_offsets) == 12
    # JetStream holds the partitions in streams of their own; the pigeon stream's own name
    # is a sealed stream that reserves the subjects and stores nothing.
    router = await t.js.stream_info(stream)
    assert router.config.sealed and router.state.messages == 0
    assert [(await t.js.stream_info(f"{stream}~{p}")).state.messages for p in range(3)] == [
        sum(1 for a in acks if a and a.partition == p) for p in range(3)
    ]
    await watcher.unsubscribe()
    await everything.unsubscribe()


async def test_message_ids_dedup_on_partitioned_streams_even_without_a_key(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make(partitions=4)
    first = await nats_transport.publish(f"{prefix}.x", b"once", msg_id="order-17")
    again = await nats_transport.publish(f"{prefix}.x", b"once", msg_id="order-17")
    assert first is not None and again is not None
    assert not first.duplicate and again.duplicate
    assert (again.partition, again.offset) == (first.partition, first.offset)
    assert (await nats_transport.stream_state(stream)).messages == 1


async def test_publish_batch_keeps_order_and_reports_every_ack(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make()
    free = unique_name("free").replace("-", "_")
    batch = [Message(f"{prefix}.b", str(i).encode()) for i in range(1200)]
    batch.insert(5, Message(f"{free}.x", b"core only"))
    acks = await nats_transport.publish_batch(batch)
    assert acks[5] is None
    stored = [a for a in acks if a is not None]
    assert [a.offset for a in stored] == list(range(1200))
    consumer = await nats_transport.consumer(stream, ConsumerSpec(unique_name("g")))
    got = await drain(consumer, 1200, batch=500)
    assert payloads(got) == [str(i).encode() for i in range(1200)]
    await consumer.close()


async def test_streams_are_created_once_and_conflicts_are_refused(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    t = nats_transport
    stream, prefix = await streams.make(partitions=2)
    await t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=2))  # the same: no-op
    with pytest.raises(StreamExistsError):
        await t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=3))
    with pytest.raises(SubjectOverlapError):
        await t.create_stream(StreamSpec(unique_name("nt"), (f"{prefix}.orders.*",)))
    with pytest.raises(InvalidConfigError):
        await t.create_stream(StreamSpec(unique_name("nt"), ("$PGN.x.>",)))
    with pytest.raises(InvalidSubjectError):
        await t.publish(f"$PGN.{stream}.0.{prefix}.x", b"forged")
    with pytest.raises(StreamNotFoundError):
        await t.stream_state(unique_name("missing"))


async def test_limits_map_to_jetstream_split_over_partitions(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, _ = await streams.make(
        partitions=2, max_msgs=11, max_bytes=10_000, max_age_s=30, dedup_window_s=0
    )
    config = (await nats_transport.js.stream_info(f"{stream}~1")).config
    assert (config.max_msgs, config.max_bytes, config.max_age) == (6, 5000, 30)
    assert config.duplicate_window == 0.1  # JetStream's minimum
    other, _ = await streams.make(max_age_s=10)  # dedup_window_s (120) exceeds max_age
    assert (await nats_transport.js.stream_info(other)).config.duplicate_window == 10


async def test_headers_that_nats_would_alter_survive(nats_transport: NatsTransport, streams: Streams) -> None:
    stream, prefix = await streams.make()
    headers = {"padded": "  spaced  ", "lines": "one\r\ntwo", "plain": "x", "empty": "", "fake": "=?b64?zz"}
    watcher = await nats_transport.subscribe(f"{prefix}.h")
    await asyncio.sleep(0.1)
    await nats_transport.publish(f"{prefix}.h", b"", key=" key\n", headers=headers)
    core = await watcher.next(5)
    consumer = await nats_transport.consumer(stream, ConsumerSpec(unique_name("g")))
    (stored,) = await drain(consumer, 1)
    for message in (core, stored.message):
        assert message.headers == headers
        assert message.key == " key\n"
    with pytest.raises(InvalidMessageError):
        await nats_transport.publish(f"{prefix}.h", b"", headers={"bad name": "x"})
    with pytest.raises(InvalidMessageError):
        await nats_transport.publish(f"{prefix}.h", b"", key="\ud800")
    await consumer.close()
    await watcher.unsubscribe()


async def test_requests_see_reply_subjects_but_stored_publishes_are_not_requests(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    _, prefix = await streams.make()
    watcher = await nats_transport.subscribe(f"{prefix}.>")
    await asyncio.sleep(0.1)
    await nats_transport.publish(f"{prefix}.stored", b"x")
    assert Headers.REPLY_TO not in (await watcher.next(5)).headers
    service = unique_name("svc").replace("-", "_")
    responder = await nats_transport.subscribe(service, queue="svc")
    await asyncio.sleep(0.1)

    async def answer() -> None:
        request = await responder.next(5)
        assert request.headers[Headers.REPLY_TO]
        await nats_transport.reply(request, b"pong")

    task = asyncio.create_task(answer())
    assert (await nats_transport.request(service, b"ping", timeout=5)).payload == b"pong"
    await task
    with pytest.raises(InvalidMessageError):
        await nats_transport.reply(Message("x.y", b""), b"no reply subject")
    await watcher.unsubscribe()
    await responder.unsubscribe()


# -- shared groups ------------------------------------------------------------------------------


async def test_groups_are_checked_and_key_order_in_shared_groups_is_refused(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, _ = await streams.make()
    with pytest.raises(UnsupportedFeatureError):
        await nats_transport.consumer(stream, ConsumerSpec(unique_name("k"), key_ordered=True))
    group = unique_name("g")
    consumer = await nats_transport.consumer(stream, ConsumerSpec(group, ack_wait_s=5))
    with pytest.raises(GroupExistsError):
        await nats_transport.consumer(stream, ConsumerSpec(group, ack_wait_s=6))
    with pytest.raises(StreamNotFoundError):
        await nats_transport.consumer(unique_name("missing"), ConsumerSpec(group))
    await consumer.close()
    with pytest.raises(MemberNotFoundError):
        await consumer.fetch(1, 0.1)


async def test_shared_settling_rules(nats_transport: NatsTransport, streams: Streams) -> None:
    stream, prefix = await streams.make()
    consumer = await nats_transport.consumer(stream, ConsumerSpec(unique_name("g"), ack_wait_s=1.0))
    for i in range(3):
        await nats_transport.publish(f"{prefix}.x", str(i).encode())
    kept, forgotten, twice = await drain(consumer, 3, ack=False)
    await twice.ack()
    with pytest.raises(AlreadySettledError):
        await twice.ack()
    for _ in range(3):  # in_progress keeps the lease past ack_wait
        await asyncio.sleep(0.4)
        await kept.in_progress()
    await kept.ack()
    with pytest.raises(DeliveryNotOwnedError):
        await forgotten.ack()  # its lease ran out: it is someone else's now
    with pytest.raises(InvalidConfigError):
        await forgotten.nack(delay=-1)
    again = await drain(consumer, 1)
    assert payloads(again) == [forgotten.message.payload] and again[0].delivery_count == 2
    await consumer.close()


async def test_shared_backoff_delays_and_term_dead_letters(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make(partitions=2)
    group = unique_name("g")
    spec = ConsumerSpec(group, ack_wait_s=10, backoff=Backoff(delays_s=(0.6,)))
    consumer = await nats_transport.consumer(stream, spec)
    await nats_transport.publish(f"{prefix}.x", b"flaky", key="k", headers={"trace": "t1"})
    (first,) = await drain(consumer, 1, ack=False)
    failed_at = time.monotonic()
    await first.nack(error=RuntimeError("down"))
    (second,) = await drain(consumer, 1, ack=False)
    assert time.monotonic() - failed_at >= 0.55, "the backoff delays the redelivery"
    assert second.delivery_count == 2
    await second.term("unrecoverable")
    assert await consumer.fetch(1, 0.5) == []
    (letter,) = await nats_transport.read_dead_letters(stream, group)
    assert letter.payload == b"flaky" and letter.key == "k" and letter.headers["trace"] == "t1"
    assert letter.headers[Headers.ERROR_MESSAGE] == "unrecoverable"
    assert letter.headers[Headers.DELIVERY_COUNT] == "2"
    assert letter.headers[Headers.ORIGINAL_PARTITION] == str(partition_for_key(b"k", 2))
    assert letter.headers[Headers.ORIGINAL_MSG_ID] == first.message.id == second.message.id
    assert letter.stream == f"{stream}-{group}-dlq"
    await consumer.close()


async def test_a_lease_that_expires_on_the_last_delivery_is_dead_lettered(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make()
    group = unique_name("g")
    consumer = await nats_transport.consumer(stream, ConsumerSpec(group, ack_wait_s=0.5, max_deliver=2))
    await nats_transport.publish(f"{prefix}.x", b"slow")
    for attempt in (1, 2):
        (got,) = await drain(consumer, 1, ack=False)
        assert got.delivery_count == attempt  # and never settled
    assert await drain(consumer, 1, timeout=2) == [], "no third delivery reaches the application"

    async def dead() -> bool:
        return bool(await nats_transport.read_dead_letters(stream, group))

    assert await eventually(dead)
    (letter,) = await nats_transport.read_dead_letters(stream, group)
    assert letter.headers[Headers.DELIVERY_COUNT] == "2"
    assert "ack_wait" in letter.headers[Headers.ERROR_MESSAGE]
    assert sum(p.lag for p in await nats_transport.lag(stream, group)) == 0
    await consumer.close()


async def test_replay_from_an_offset_on_every_partition_and_from_now(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make(partitions=2)
    keys = {partition_for_key(f"k{i}".encode(), 2): f"k{i}" for i in range(10)}
    for i in range(10):
        await nats_transport.publish(f"{prefix}.x", str(i).encode(), key=keys[i % 2])
    later = await nats_transport.consumer(stream, ConsumerSpec(unique_name("l"), start=StartAt.latest()))
    from_3 = await nats_transport.consumer(stream, ConsumerSpec(unique_name("o"), start=StartAt.offset(3)))
    got = await drain(from_3, 4)
    assert sorted((r.partition, r.offset) for r in got) == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert await drain(later, 1, timeout=0.5) == []
    await nats_transport.publish(f"{prefix}.x", b"new")
    assert payloads(await drain(later, 1)) == [b"new"]
    await later.close()
    await from_3.close()


async def test_lag_per_partition_and_deleting_a_group(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make(partitions=2)
    group = unique_name("g")
    consumer = await nats_transport.consumer(stream, ConsumerSpec(group))
    for i in range(6):
        await nats_transport.publish(f"{prefix}.x", b"m", key=f"k{i}")
    lag = await nats_transport.lag(stream, group)
    assert [p.partition for p in lag] == [0, 1]
    assert [p.head for p in lag] == [p.lag for p in lag] and sum(p.lag for p in lag) == 6
    held = await drain(consumer, 2, ack=False)
    lag = await nats_transport.lag(stream, group)
    # At least what was handed out (a request still open may have leased one more).
    assert sum(p.in_flight for p in lag) >= 2 and sum(p.lag for p in lag) == 6
    for received in held:
        await received.ack()
    await consumer.close()
    await nats_transport.delete_group(stream, group)
    with pytest.raises(GroupNotFoundError):
        await nats_transport.lag(stream, group)
    with pytest.raises(GroupNotFoundError):
        await nats_transport.delete_group(stream, group)


async def test_deleting_a_stream_deletes_what_pigeon_made_for_it(nats_transport: NatsTransport) -> None:
    t = nats_transport
    stream = unique_name("nt")
    prefix = stream.replace("-", "_")
    await t.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=2))
    try:
        shared, ordered = unique_name("s"), unique_name("o")
        member = await t.consumer(stream, ConsumerSpec(shared))
        reader = await t.consumer(stream, ConsumerSpec(ordered, kind="ordered"))
        await t.publish(f"{prefix}.x", b"poison")
        (got,) = await drain(member, 1, ack=False)
        await got.term("bad")
        await member.close()
        await reader.close()
    finally:
        await t.delete_stream(stream)
    names = set()
    for info in await t.js.streams_info():
        names.add(info.config.name)
    assert not {n for n in names if n and (n.startswith(stream) or stream in n)}


async def test_list_streams_names_pigeon_streams_only(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    t = nats_transport
    stream, _ = await streams.make(partitions=2)
    ordered = await t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))  # a KV bucket
    foreign = unique_name("foreign")
    await t.js.add_stream(name=foreign, subjects=[f"{foreign.replace('-', '_')}.>"])
    try:
        listed = await t.list_streams()
    finally:
        await t.js.delete_stream(foreign)
    assert stream in listed and foreign not in listed and listed == sorted(listed)
    assert not [name for name in listed if stream in name and name != stream]  # partitions, bucket
    await ordered.close()


async def test_purge_forgets_deliveries_and_prefetches_in_every_process(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    t = nats_transport
    stream, prefix = await streams.make(partitions=2)
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=1.0)
    here = await t.consumer(stream, spec)
    elsewhere = await open_nats(FAST)
    try:
        there = await elsewhere.consumer(stream, spec)
        ordered = await t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered", ack_wait_s=10))
        for i in range(8):
            await t.publish(f"{prefix}.old", f"old{i}".encode(), key=f"k{i}")
        held = await drain(here, 3, ack=False)
        # A fetch of one asks both partitions: the other answer is prefetched into a buffer.
        held += await there.fetch(1, 5)
        batch = await ordered.fetch(10, 5)
        await asyncio.sleep(0.2)
        await t.purge_stream(stream)
        for p in range(2):
            assert (await t.js.stream_info(f"{stream}~{p}")).state.messages == 0
        await held[0].ack()  # held across the purge: settling it still works
        for delivery in batch[1:]:
            if delivery.partition != batch[0].partition:
                await delivery.ack()
        await batch[0].nack()  # an ordered rewind to a purged message moves on to what is left
        for i in range(4):
            await t.publish(f"{prefix}.new", f"new{i}".encode(), key=f"k{i}")
        new = sorted(f"new{i}".encode() for i in range(4))
        got = await drain_all([here, there], 4, timeout=5)
        assert sorted(payloads([r for g in got for r in g])) == new
        assert sorted(payloads(await drain(ordered, 5, timeout=3))) == new
        # Past ack_wait: the purged deliveries nobody settled do not come back.
        assert await drain(here, 1, timeout=1.5) == []
        assert sum(p.lag for p in await t.lag(stream, spec.group)) == 0
        await there.close()
    finally:
        await elsewhere.close()
    await here.close()
    await ordered.close()


# -- ordered groups -----------------------------------------------------------------------------


async def test_ordered_nack_rewinds_to_the_failed_message(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make()
    # Stored before the member joins: its first read must see all four of the batch (a read
    # racing the publishes could take fewer, and an unsettled batch holds the rest back).
    for i in range(6):
        await nats_transport.publish(f"{prefix}.x", str(i).encode())
    consumer = await nats_transport.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    batch = await drain(consumer, 4, ack=False, batch=4)
    assert payloads(batch) == [b"0", b"1", b"2", b"3"]
    await batch[0].ack()
    await batch[2].ack()  # after an unsettled one: not committed, so it comes again
    failed_at = time.monotonic()
    await batch[1].nack(delay=0.5, error="try later")
    with pytest.raises(DeliveryNotOwnedError):
        await batch[3].ack()  # the rewind took the rest of the batch back
    again = await drain(consumer, 5, timeout=10)
    assert time.monotonic() - failed_at >= 0.45
    assert payloads(again) == [b"1", b"2", b"3", b"4", b"5"]
    assert [r.delivery_count for r in again] == [2, 2, 2, 1, 1]
    await consumer.close()


async def test_ordered_max_deliver_dead_letters_and_moves_on(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make()
    group = unique_name("o")
    consumer = await nats_transport.consumer(stream, ConsumerSpec(group, kind="ordered", max_deliver=2))
    await nats_transport.publish(f"{prefix}.x", b"poison")
    await nats_transport.publish(f"{prefix}.x", b"fine")
    for _ in range(2):
        (first, *_) = await drain(consumer, 1, ack=False, batch=1)
        assert first.message.payload == b"poison"
        await first.nack(error=ValueError("no"))
    assert payloads(await drain(consumer, 1)) == [b"fine"]
    (letter,) = await nats_transport.read_dead_letters(stream, group)
    assert letter.payload == b"poison" and letter.headers[Headers.ERROR_TYPE] == "ValueError"
    await consumer.close()


async def test_ordered_partitions_move_as_members_join_and_leave(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make(partitions=2)
    group = unique_name("o")
    spec = ConsumerSpec(group, kind="ordered")
    first = await nats_transport.consumer(stream, spec, member="first")

    async def owners(expected: list[str | None]) -> bool:
        return [p.owner for p in await nats_transport.lag(stream, group)] == expected

    assert await owners(["first", "first"])
    second = await nats_transport.consumer(stream, spec, member="second")
    assert await eventually(lambda: owners(["first", "second"]), timeout=5)
    for i in range(20):
        await nats_transport.publish(f"{prefix}.x", str(i).encode(), key=f"k{i}")
    got_first, got_second = await drain(first, 100, timeout=1.5), await drain(second, 100, timeout=1.5)
    assert {r.partition for r in got_first} == {0} and {r.partition for r in got_second} == {1}
    assert len(got_first) + len(got_second) == 20
    await second.close()
    assert await eventually(lambda: owners(["first", "first"]), timeout=5)
    await first.close()
    assert await eventually(lambda: owners([None, None]), timeout=5)


async def test_a_dead_members_batch_goes_first_to_the_next_owner(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, prefix = await streams.make()
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    doomed_transport = await open_nats(FAST)
    doomed = await doomed_transport.consumer(stream, spec, member="doomed")
    survivor = await nats_transport.consumer(stream, spec, member="survivor")

    async def doomed_owns_it() -> bool:
        return [p.owner for p in await nats_transport.lag(stream, spec.group)] == ["doomed"]

    # Settled first: a fetch racing the survivor's join could see its batch taken back.
    assert await eventually(doomed_owns_it, timeout=5)
    for i in range(6):
        await nats_transport.publish(f"{prefix}.x", str(i).encode())
    batch = await drain(doomed, 3, ack=False, batch=3)
    assert payloads(batch) == [b"0", b"1", b"2"]
    await batch[0].ack()
    # A crash: no goodbye, the connection just goes away.
    task = getattr(doomed, "_task", None)
    if task is not None:
        task.cancel()
    await doomed_transport.nc.close()
    started = time.monotonic()
    rest = await drain(survivor, 5, timeout=15)
    assert payloads(rest) == [b"1", b"2", b"3", b"4", b"5"]
    assert [r.delivery_count for r in rest[:2]] == [2, 2]
    assert time.monotonic() - started < 10
    await survivor.close()
    await doomed_transport.close()


async def test_the_coordination_bucket_keeps_the_session_timeout_of_the_first_member(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    stream, _ = await streams.make()
    group = unique_name("o")
    consumer = await nats_transport.consumer(stream, ConsumerSpec(group, kind="ordered"))
    bucket = f"PGN{len(stream)}_{stream}_{group}"
    status = await (await nats_transport.js.key_value(bucket)).status()
    assert status.ttl == FAST.session_timeout_s
    info = await nats_transport.js.consumer_info(stream, group)
    assert info.config.ack_wait == FAST.session_timeout_s / 2
    assert json.loads(info.config.description.split(":", 1)[1])["kind"] == "ordered"  # type: ignore[union-attr]
    await consumer.close()


async def test_messages_nacked_just_before_leaving_go_to_the_next_member_at_once(
    nats_transport: NatsTransport, streams: Streams
) -> None:
    # Leaving with a pull request still open on the server used to hand its next message to
    # an inbox nobody listened on: invisible until ack_wait (here 20 s).
    name, prefix = await streams.make()
    for i in range(5):
        await nats_transport.publish(f"{prefix}.x", b"m%d" % i)
    for _ in range(6):
        consumer = await nats_transport.consumer(name, ConsumerSpec("g", ack_wait_s=20))
        got: list[Received] = []
        deadline = time.monotonic() + 3
        while len(got) < 5 and time.monotonic() < deadline:
            got += await consumer.fetch(10, 1.0)  # asks for more than there is: the request stays open
        assert len(got) == 5
        for received in got:
            await received.nack()
        await consumer.close()
