"""The RabbitMQ transport beyond the conformance suite: partitions and offsets, the shared
registry, history for new groups, leases and retries, ordered groups' hand-over and
failures, lag, clean-up, and the refusals."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiormq.exceptions
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
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from pigeon.message import Headers, Message
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import Consumer, ConsumerSpec, GroupKind, Received, StreamSpec
from pigeon.transport.rabbitmq import RabbitMQOptions, RabbitMQTransport
from pigeon.transport.rabbitmq._ordered import OrderedConsumer

FAST = RabbitMQOptions(heartbeat_interval_s=0.2, session_timeout_s=1.0, join_wait_s=0.1)


@pytest.fixture
def url() -> str:
    return require_service("rabbitmq")


class Env:
    """A transport plus the streams a test created (deleted at the end)."""

    def __init__(self, transport: RabbitMQTransport, url: str) -> None:
        self.t = transport
        self.url = url
        self.created: list[str] = []
        self.others: list[RabbitMQTransport] = []

    async def stream(self, partitions: int = 1, **limits: Any) -> tuple[str, str]:
        name = unique_name("rq")
        prefix = name.replace("-", "_")
        await self.t.create_stream(StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits))
        self.created.append(name)
        return name, prefix

    async def another(self, options: RabbitMQOptions = FAST) -> RabbitMQTransport:
        transport = await RabbitMQTransport.open(self.url, options)
        self.others.append(transport)
        return transport


@pytest.fixture
async def env(url: str) -> AsyncIterator[Env]:
    transport = await RabbitMQTransport.open(url, FAST)
    env = Env(transport, url)
    try:
        yield env
    finally:
        for other in env.others:
            with contextlib.suppress(Exception):
                await other.close()
        for name in env.created:
            with contextlib.suppress(StreamNotFoundError):
                await transport.delete_stream(name)
        await transport.close()


async def drain(
    consumer: Consumer, expected: int, *, timeout: float = 10.0, ack: bool = True
) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        for received in await consumer.fetch(expected - len(got), 0.5):
            got.append(received)
            if ack:
                await received.ack()
    return got


async def until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


async def queue_exists(url: str, name: str) -> bool:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        try:
            await raw.queue_declare(name, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    finally:
        await connection.close()


# -- refusals and bad input ---------------------------------------------------------------------------


async def test_refuses_what_rabbitmq_cannot_do(env: Env) -> None:
    stream, prefix = await env.stream()
    assert not env.t.capabilities.dedup
    with pytest.raises(UnsupportedFeatureError, match="rabbitmq"):
        await env.t.publish(f"{prefix}.x", b"once", msg_id="order-1")
    with pytest.raises(UnsupportedFeatureError):
        await env.t.publish_batch([Message(f"{prefix}.x", b"", id="explicit")])
    with pytest.raises(UnsupportedFeatureError, match="max_bytes or max_age_s"):
        await env.t.create_stream(StreamSpec(unique_name("rq"), ("nowhere.x",), max_msgs=10))
    with pytest.raises(UnsupportedFeatureError, match="ordered group"):
        await env.t.consumer(stream, ConsumerSpec(unique_name("g"), key_ordered=True))
    assert await env.t.stream_state(stream) is not None  # nothing above touched the stream


async def test_rejects_bad_input(env: Env, url: str) -> None:
    stream, prefix = await env.stream()
    with pytest.raises(InvalidMessageError, match="reserved"):
        await env.t.publish(f"{prefix}.x", b"", headers={"x-pigeon-key": "forged"})
    with pytest.raises(InvalidMessageError, match="reserved"):
        await env.t.publish(f"{prefix}.x", b"", headers={"x-death": "no"})
    with pytest.raises(InvalidMessageError):
        await env.t.publish(f"{prefix}.x", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidSubjectError, match="255"):
        await env.t.publish(f"{prefix}." + "a" * 300, b"")
    with pytest.raises(InvalidSubjectError):
        await env.t.publish(f"{prefix}.*", b"")
    with pytest.raises(InvalidConfigError):
        RabbitMQOptions(heartbeat_interval_s=5, session_timeout_s=6)
    with pytest.raises(InvalidConfigError):
        await RabbitMQTransport.open(url, object())
    with pytest.raises(InvalidConfigError):
        await RabbitMQTransport.open("redis://localhost", FAST)
    with pytest.raises(StreamNotFoundError):
        await env.t.consumer(unique_name("missing"), ConsumerSpec("g"))
    with pytest.raises(GroupNotFoundError):
        await env.t.lag(stream, "nobody")
    with pytest.raises(GroupNotFoundError):
        await env.t.delete_group(stream, "nobody")
    with pytest.raises(InvalidConfigError):
        await env.t.read_dead_letters(stream, "g", 0)


async def test_cannot_reach_a_broker_that_is_not_there() -> None:
    with pytest.raises(TransportClosedError):
        await RabbitMQTransport.open("amqp://guest:guest@127.0.0.1:1/", RabbitMQOptions(connect_timeout_s=1))


async def test_a_closed_transport_refuses_everything(url: str) -> None:
    transport = await connect(url, FAST)
    await transport.close()
    await transport.close()  # twice is fine
    with pytest.raises(TransportClosedError):
        await transport.publish("any.thing", b"")


# -- streams, partitions, offsets, the registry --------------------------------------------------------


async def test_keyed_messages_land_in_the_partition_of_their_key(env: Env) -> None:
    stream, prefix = await env.stream(partitions=3)
    keys = [f"customer-{i}" for i in range(12)]
    acks = [await env.t.publish(f"{prefix}.e", key.encode(), key=key) for key in keys]
    for key, ack in zip(keys, acks, strict=True):
        assert ack is not None and ack.partition == partition_for_key(key.encode(), 3)
    # PubAck.offset is this publisher's sequence per partition: 0, 1, 2, ...
    for p in range(3):
        assert [a.offset for a in acks if a and a.partition == p] == list(
            range(sum(1 for a in acks if a and a.partition == p))
        )
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    got = await drain(consumer, 12)
    assert sorted(r.message.payload.decode() for r in got) == sorted(keys)
    for received in got:
        assert received.message.key is not None
        assert received.partition == partition_for_key(received.message.key.encode(), 3)
    # Stored offsets are the stream queues': dense from 0 in each partition.
    for p in range(3):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == list(range(len(offsets)))
    state = await env.t.stream_state(stream)
    assert state.messages == 12 and state.partitions == 3
    assert [last + 1 for last in state.last_offsets] == [
        sum(1 for r in got if r.partition == p) for p in range(3)
    ]
    await consumer.close()


async def test_unkeyed_messages_spread_and_batches_keep_their_order(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    acks = await env.t.publish_batch([Message(f"{prefix}.e", str(i).encode()) for i in range(10)])
    assert [a.partition for a in acks if a] == [0, 1] * 5
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    got = await drain(consumer, 10)
    for p in (0, 1):
        assert [int(r.message.payload) for r in got if r.partition == p] == list(range(p, 10, 2))
    await consumer.close()


async def test_headers_keys_ids_and_timestamps_travel(env: Env) -> None:
    stream, prefix = await env.stream()
    before = time.time()
    await env.t.publish(f"{prefix}.a.b", b"\x00\xff", key="k", headers={"Trace": "1", "empty": ""})
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    (received,) = await drain(consumer, 1)
    message = received.message
    assert (message.subject, message.payload, message.key) == (f"{prefix}.a.b", b"\x00\xff", "k")
    assert message.headers == {"Trace": "1", "empty": ""}
    assert before - 1 <= message.timestamp <= time.time() + 1
    assert len(message.id) == 36 and message.stream == stream
    await consumer.close()


async def test_the_registry_is_shared_between_transports(env: Env) -> None:
    other = await env.another()
    stream, prefix = await env.stream()
    # The other transport follows the registry log: the new stream is routed there soon.
    assert await until(lambda: other.registry.route(f"{prefix}.x") is not None)
    ack = await other.publish(f"{prefix}.x", b"from the other")
    assert ack is not None and ack.stream == stream
    with pytest.raises(StreamExistsError):
        await other.create_stream(StreamSpec(stream, (f"{prefix}.>",), partitions=2))
    await other.create_stream(StreamSpec(stream, (f"{prefix}.>",)))  # the same: a no-op
    with pytest.raises(SubjectOverlapError):
        await other.create_stream(StreamSpec(unique_name("rq"), (f"{prefix}.x",)))
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    assert [r.message.payload for r in await drain(consumer, 1)] == [b"from the other"]
    await consumer.close()
    # Deleted here while the other still routes to it: its publish notices and goes core-only.
    env.created.remove(stream)
    await env.t.delete_stream(stream)
    assert await other.publish(f"{prefix}.x", b"late") is None
    with pytest.raises(StreamNotFoundError):
        await other.stream_state(stream)


async def test_a_group_with_another_spec_is_refused(env: Env) -> None:
    stream, _ = await env.stream()
    group = unique_name("g")
    first = await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=5))
    with pytest.raises(GroupExistsError):
        await env.t.consumer(stream, ConsumerSpec(group, ack_wait_s=6))
    with pytest.raises(GroupExistsError):
        await env.t.consumer(stream, ConsumerSpec(group, kind="ordered"))
    await first.close()


async def test_deleting_a_stream_removes_every_queue_and_exchange(env: Env, url: str) -> None:
    stream, prefix = await env.stream(partitions=2)
    shared = await env.t.consumer(stream, ConsumerSpec("s", ack_wait_s=5))
    ordered = await env.t.consumer(stream, ConsumerSpec("o", kind="ordered"))
    await env.t.publish(f"{prefix}.x", b"retry me", key="a")
    (received,) = await drain(shared, 1, ack=False)
    await received.nack(delay=0.05)  # creates a retry queue
    names = env.t.names
    queues = [
        names.partition_queue(stream, 0),
        names.group_queue(stream, "s"),
        names.level_queue(stream, "s", 6),
        names.token_queue(stream, "o", 1),
        names.commit_queue(stream, "o", 0),
        names.partition_queue(f"{stream}-s-dlq", 0),
    ]
    assert all([await queue_exists(url, q) for q in queues])
    env.created.remove(stream)
    await env.t.delete_stream(stream)
    assert not any([await queue_exists(url, q) for q in queues])
    with pytest.raises(TransportClosedError):
        await ordered.fetch(1, 0.1)
    with pytest.raises(StreamNotFoundError):
        await env.t.delete_stream(stream)


async def test_members_notice_their_group_was_deleted_elsewhere(env: Env) -> None:
    stream, prefix = await env.stream()
    shared = await env.t.consumer(stream, ConsumerSpec("s"))
    ordered = await env.t.consumer(stream, ConsumerSpec("o", kind="ordered"))
    await env.t.publish(f"{prefix}.x", b"one")
    assert len(await drain(shared, 1)) == 1
    assert len(await drain(ordered, 1)) == 1
    other = await env.another()
    await other.delete_group(stream, "s")
    await other.delete_group(stream, "o")
    for consumer in (shared, ordered):
        with pytest.raises(GroupNotFoundError):
            for _ in range(20):
                await consumer.fetch(1, 0.1)
        await consumer.close()
    assert env.t.registry.streams[stream].groups == {}


async def test_retention_by_bytes_is_passed_to_the_stream_queues(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2, max_bytes=2_000_000, max_age_s=3600)
    await env.t.publish(f"{prefix}.x", b"kept")
    assert (await env.t.stream_state(stream)).messages == 1


# -- new groups and history ----------------------------------------------------------------------------


async def test_new_groups_start_where_they_are_told(env: Env) -> None:
    stream, prefix = await env.stream()
    for i in range(5):
        await env.t.publish(f"{prefix}.x", f"old{i}".encode())
    await asyncio.sleep(1.1)
    boundary = time.time()
    for i in range(5):
        await env.t.publish(f"{prefix}.x", f"new{i}".encode())
    kinds: tuple[GroupKind, ...] = ("shared", "ordered")
    for kind in kinds:
        from_offset = await env.t.consumer(
            stream, ConsumerSpec(unique_name("f"), kind=kind, start=StartAt.offset(3))
        )
        got = await drain(from_offset, 7)
        assert sorted(r.message.payload for r in got) == sorted(
            [b"old3", b"old4"] + [f"new{i}".encode() for i in range(5)]
        )
        # Copies made from the stream queue know their offsets.
        assert sorted(r.offset for r in got) == list(range(3, 10))
        await from_offset.close()
        from_time = await env.t.consumer(
            stream, ConsumerSpec(unique_name("t"), kind=kind, start=StartAt.time(boundary))
        )
        got = await drain(from_time, 5)
        assert sorted(r.message.payload for r in got) == [f"new{i}".encode() for i in range(5)]
        assert await from_time.fetch(1, 0.3) == []
        await from_time.close()
    latest = [
        await env.t.consumer(stream, ConsumerSpec(unique_name("l"), kind=k, start=StartAt.latest()))
        for k in kinds
    ]
    for consumer in latest:
        assert await consumer.fetch(1, 0.3) == []
    await env.t.publish(f"{prefix}.x", b"after")
    for consumer in latest:
        assert [r.message.payload for r in await drain(consumer, 1)] == [b"after"]
        await consumer.close()


# -- shared groups ------------------------------------------------------------------------------------------


async def test_settling_twice_or_too_late_is_an_error(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g"), ack_wait_s=0.5))
    await env.t.publish(f"{prefix}.x", b"one")
    await env.t.publish(f"{prefix}.x", b"two")
    first, second = await drain(consumer, 2, ack=False)
    await first.ack()
    with pytest.raises(AlreadySettledError):
        await first.ack()
    with pytest.raises(AlreadySettledError):
        await first.nack()
    await asyncio.sleep(0.7)  # the second's lease runs out
    with pytest.raises(DeliveryNotOwnedError):
        await second.ack()
    again = await drain(consumer, 1, ack=False)
    assert [(r.message.payload, r.delivery_count) for r in again] == [(b"two", 2)]
    # in_progress extends the lease past ack_wait_s.
    for _ in range(3):
        await asyncio.sleep(0.3)
        await again[0].in_progress()
    await again[0].ack()
    assert await consumer.fetch(1, 0.3) == []
    await consumer.close()


async def test_nack_uses_the_backoff_and_counts_deliveries(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), backoff=Backoff(delays_s=(0.3, 0.6)), max_deliver=5)
    consumer = await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"flaky", key="k")
    (received,) = await drain(consumer, 1, ack=False)
    for attempt, delay in ((1, 0.3), (2, 0.6)):
        assert received.delivery_count == attempt
        nacked = time.monotonic()
        await received.nack(error=RuntimeError(f"attempt {attempt}"))
        (received,) = await drain(consumer, 1, ack=False)
        assert time.monotonic() - nacked >= delay
    assert received.delivery_count == 3
    await received.term("giving up")
    (letter,) = await env.t.read_dead_letters(stream, spec.group)
    assert letter.payload == b"flaky" and letter.key == "k"
    assert letter.headers[Headers.ERROR_MESSAGE] == "giving up"
    assert letter.headers[Headers.DELIVERY_COUNT] == "3"
    assert letter.headers[Headers.GROUP] == spec.group
    assert letter.headers[Headers.ORIGINAL_OFFSET] == "-1"  # routed to the queue: offset unknown
    assert letter.headers[Headers.FIRST_FAILURE_AT] < letter.headers[Headers.LAST_FAILURE_AT]
    assert await env.t.read_dead_letters(stream, "no-such-group") == []
    await consumer.close()


async def test_a_lease_that_expires_on_the_last_delivery_is_dead_lettered(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"), ack_wait_s=0.3, max_deliver=1)
    consumer = await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"slow")
    (received,) = await drain(consumer, 1, ack=False)
    await asyncio.sleep(0.5)
    assert await consumer.fetch(1, 0.5) == []
    deadline = time.monotonic() + 5
    letters: list[Message] = []
    while not letters and time.monotonic() < deadline:
        letters = await env.t.read_dead_letters(stream, spec.group)
    assert [m.headers[Headers.ERROR_TYPE] for m in letters] == ["MaxDeliveriesExceeded"]
    with pytest.raises(DeliveryNotOwnedError):
        await received.ack()
    await consumer.close()


async def test_max_ack_pending_bounds_what_a_member_holds(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("g"), max_ack_pending=3))
    for i in range(6):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    held = await consumer.fetch(10, 5)
    assert len(held) == 3
    assert await consumer.fetch(10, 0.5) == []
    await held[0].ack()
    more = await consumer.fetch(10, 5)
    assert len(more) == 1
    for received in [*held[1:], *more]:
        await received.ack()
    assert len(await drain(consumer, 2)) == 2
    await consumer.close()


async def test_leaving_returns_unseen_messages_without_counting_them(
    env: Env, loop_errors: list[dict[str, Any]]
) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("g"))
    first = await env.t.consumer(stream, spec)
    for i in range(8):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    got = await drain(first, 4, ack=False)
    for received in got[:3]:
        await received.ack()  # RabbitMQ refills the member: those arrive unseen
    await asyncio.sleep(0.2)
    await first.close()  # got[3] was handed out and not settled
    second = await env.t.consumer(stream, spec)
    rest = await drain(second, 5)
    counts = {r.message.payload: r.delivery_count for r in rest}
    assert sorted(counts) == sorted(str(i).encode() for i in range(3, 8))
    assert counts[got[3].message.payload] == 2
    assert [c for p, c in counts.items() if p != got[3].message.payload] == [1, 1, 1, 1]
    await second.close()
    assert loop_errors == []


async def test_shared_lag_counts_ready_waiting_and_held(env: Env) -> None:
    stream, prefix = await env.stream()
    group = unique_name("g")
    consumer = await env.t.consumer(stream, ConsumerSpec(group))
    for i in range(5):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    held = await consumer.fetch(2, 5)
    await held[0].nack(delay=30)
    # One held, one refilled into the member unseen, one waiting 30 s, two ready (once
    # RabbitMQ has processed the nack's ack: acks have no answer).
    for _ in range(50):
        (lag,) = await env.t.lag(stream, group)
        if lag.lag == 5:
            break
    assert (lag.partition, lag.head, lag.committed) == (-1, -1, -1)
    assert (lag.lag, lag.waiting, lag.pending + lag.in_flight) == (5, 1, 4)
    assert lag.in_flight >= 1
    await consumer.close()


# -- ordered groups ------------------------------------------------------------------------------------------


async def test_ordered_nack_rewinds_and_counts_what_was_delivered(env: Env) -> None:
    stream, prefix = await env.stream()
    consumer = await env.t.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    for i in range(5):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    seen: list[tuple[int, int]] = []
    nacked_at = 0.0
    delivered_with_the_nacked: list[int] = []
    deadline = time.monotonic() + 10
    while len([i for i, _ in seen if i == 4]) < 1 and time.monotonic() < deadline:
        batch = await consumer.fetch(10, 0.5)
        for index, received in enumerate(batch):
            value = int(received.message.payload)
            seen.append((value, received.delivery_count))
            if value == 2 and not nacked_at:
                nacked_at = time.monotonic()
                await received.nack(delay=0.5, error="later")
                delivered_with_the_nacked = [int(r.message.payload) for r in batch[index + 1 :]]
                for later in batch[index + 1 :]:
                    with pytest.raises(DeliveryNotOwnedError):
                        await later.ack()  # the rewind cancelled the rest of the batch
                break
            await received.ack()
            if value == 2:
                assert time.monotonic() - nacked_at >= 0.45
    # In order, the nacked message again (counted twice), then the rest: counted twice
    # when they had been delivered with it.
    assert [value for value, _ in seen] == [0, 1, 2, *delivered_with_the_nacked, 2, 3, 4]
    after = dict(seen[-3:])
    assert after[2] == 2
    assert all(after[v] == (2 if v in delivered_with_the_nacked else 1) for v in (3, 4))
    assert await consumer.fetch(1, 0.3) == []
    await consumer.close()


async def test_ordered_max_deliver_dead_letters_and_moves_on(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("o"), kind="ordered", max_deliver=2)
    consumer = await env.t.consumer(stream, spec)
    await env.t.publish(f"{prefix}.x", b"poison")
    for attempt in (1, 2):
        (first,) = await drain(consumer, 1, ack=False)
        assert (first.message.payload, first.delivery_count) == (b"poison", attempt)
        await first.nack(error=ValueError("no"))
    await env.t.publish(f"{prefix}.x", b"fine")
    (fine,) = await drain(consumer, 1)
    assert (fine.message.payload, fine.offset) == (b"fine", 1)
    (letter,) = await env.t.read_dead_letters(stream, spec.group)
    assert letter.headers[Headers.ORIGINAL_OFFSET] == "0"
    assert letter.headers[Headers.ORIGINAL_PARTITION] == "0"
    assert letter.headers[Headers.ERROR_TYPE] == "ValueError"
    await consumer.close()


async def test_ordered_members_split_partitions_and_hand_them_over(
    env: Env, loop_errors: list[dict[str, Any]]
) -> None:
    stream, prefix = await env.stream(partitions=2)
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    first = await env.t.consumer(stream, spec)
    second = await env.t.consumer(stream, spec)
    for i in range(20):
        await env.t.publish(f"{prefix}.e", str(i).encode(), key=f"k{i}")
    assert isinstance(first, OrderedConsumer) and isinstance(second, OrderedConsumer)
    assert await until(lambda: (first.owned, second.owned) == ([0], [1]))
    on_first = sum(1 for i in range(20) if partition_for_key(f"k{i}".encode(), 2) == 0)
    got_first = await drain(first, on_first)
    assert {r.partition for r in got_first} == {0}
    # The second leaves after acknowledging part of its partition; the first takes it over
    # from the committed offset: nothing lost, nothing acknowledged seen again.
    partial = await drain(second, 3)
    await second.close()
    rest = await drain(first, 20 - on_first - 3)
    seen = sorted(int(r.message.payload) for r in [*got_first, *partial, *rest])
    assert seen == list(range(20))
    assert all(r.delivery_count == 1 for r in rest)
    await first.close()
    assert loop_errors == []


async def test_a_dead_members_partitions_move_after_the_session_timeout(env: Env) -> None:
    stream, prefix = await env.stream()
    spec = ConsumerSpec(unique_name("o"), kind="ordered")
    doomed_transport = await env.another()
    doomed = await doomed_transport.consumer(stream, spec)
    survivor = await env.t.consumer(stream, spec)
    for i in range(3):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    taken = await drain(doomed, 3, ack=False)
    assert len(taken) == 3
    await taken[0].ack()  # acknowledged but the batch never finished: not committed
    await doomed_transport._connection.close()  # dies without leaving
    got = await drain(survivor, 3, timeout=10)
    assert [(int(r.message.payload), r.delivery_count) for r in got] == [(0, 2), (1, 2), (2, 2)]
    await survivor.close()


async def test_ordered_lag_follows_commits(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    group = unique_name("o")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind="ordered"))
    for i in range(10):
        await env.t.publish(f"{prefix}.x", str(i).encode())
    lags = await env.t.lag(stream, group)
    assert [(lag.partition, lag.head, lag.committed, lag.lag) for lag in lags] == [(0, 5, 0, 5), (1, 5, 0, 5)]
    await drain(consumer, 10)
    lags = await env.t.lag(stream, group)
    assert [(lag.head, lag.committed, lag.lag) for lag in lags] == [(5, 5, 0), (5, 5, 0)]
    assert isinstance(consumer, OrderedConsumer)
    assert {lag.owner for lag in lags} == {consumer.name}
    await consumer.close()


# -- core messaging -----------------------------------------------------------------------------------


async def test_wildcards_are_exact_even_with_a_literal_hash_token(env: Env) -> None:
    base = unique_name("w").replace("-", "_")
    hashes = await env.t.subscribe(f"{base}.#")  # '#' is an ordinary token in pigeon
    rest = await env.t.subscribe(f"{base}.>")
    await asyncio.sleep(0.1)
    await env.t.publish(base, b"no tokens after")
    await env.t.publish(f"{base}.x", b"x")
    await env.t.publish(f"{base}.#", b"literal")
    assert (await hashes.next(5)).payload == b"literal"
    with pytest.raises(TimeoutError):
        await hashes.next(0.3)
    assert sorted([(await rest.next(5)).payload for _ in range(2)]) == [b"literal", b"x"]
    with pytest.raises(TimeoutError):
        await rest.next(0.3)
    await hashes.unsubscribe()
    await rest.unsubscribe()


async def test_subscribers_see_the_reply_subject_of_requests(env: Env) -> None:
    subject = f"{unique_name('svc').replace('-', '_')}.time"
    service = await env.t.subscribe(subject, queue="svc")
    await asyncio.sleep(0.1)

    async def answer() -> None:
        request = await service.next(5)
        assert request.headers[Headers.REPLY_TO].startswith("_INBOX.")
        await env.t.reply(request, b"noon")

    task = asyncio.create_task(answer())
    reply = await env.t.request(subject, b"?", timeout=5)
    await task
    assert reply.payload == b"noon"
    with pytest.raises(InvalidMessageError):
        await env.t.reply(Message("plain.message"), b"")
    await service.unsubscribe()


async def test_the_registry_is_snapshotted_and_read_from_the_snapshot(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.transport.rabbitmq import _registry

    monkeypatch.setattr(_registry, "SNAPSHOT_EVERY", 3)
    stream, _ = await env.stream(partitions=2)
    group = unique_name("g")
    consumer = await env.t.consumer(stream, ConsumerSpec(group, kind="ordered", max_deliver=4))
    await env.t.registry.sync()  # the record that makes this transport write a snapshot
    reader = await env.another()
    assert reader.registry.offset >= env.t.registry.offset - 1  # caught up
    entry = reader.registry.streams[stream]
    assert entry.spec == env.t.registry.streams[stream].spec
    assert entry.groups[group].spec == ConsumerSpec(group, kind="ordered", max_deliver=4)
    assert entry.groups[group].starts == [0, 0]
    await consumer.close()


# -- listing and purging ---------------------------------------------------------------------------------


async def test_purge_reaches_copies_members_hold_and_other_processes(env: Env) -> None:
    stream, prefix = await env.stream(partitions=2)
    group = unique_name("g")
    spec = ConsumerSpec(group, ack_wait_s=1)
    here = await env.t.consumer(stream, spec)
    other = await env.another()
    there = await other.consumer(stream, spec)
    ordered = await other.consumer(stream, ConsumerSpec(unique_name("o"), kind="ordered"))
    for i in range(12):
        await env.t.publish(f"{prefix}.old", f"old{i}".encode(), key=f"k{i}")
    held = await drain(here, 4, ack=False)
    for received in held[:2]:
        await received.ack()  # RabbitMQ refills the member: two copies wait in it unseen
    assert len(await drain(there, 3, ack=False)) == 3
    await held[2].term("poison")
    (letter,) = await env.t.read_dead_letters(stream, group)
    await env.t.purge_stream(stream)
    assert await until(lambda: other.registry.streams[stream].purges == 1)
    assert other.registry.streams[stream].floors == env.t.registry.streams[stream].floors
    await there.close()  # its three go back to the queue: dropped when fetched
    await held[3].nack()  # its copy comes back: dropped
    for i in range(3):
        await env.t.publish(f"{prefix}.new", f"new{i}".encode(), key=f"k{i}")
    new = [f"new{i}".encode() for i in range(3)]
    assert sorted(r.message.payload for r in await drain(here, 4, timeout=3)) == new
    assert sorted(r.message.payload for r in await drain(ordered, 4, timeout=3)) == new
    assert (await env.t.stream_state(stream)).messages == 3
    # The dead letters stay; a group created now starts at the purge, not before it.
    assert [m.id for m in await env.t.read_dead_letters(stream, group)] == [letter.id]
    late = await env.t.consumer(stream, ConsumerSpec(unique_name("g")))
    assert sorted(r.message.payload for r in await drain(late, 4, timeout=3)) == new
    for consumer in (here, ordered, late):
        await consumer.close()


async def test_listing_follows_other_processes_and_deletions(env: Env) -> None:
    other = await env.another()
    name = unique_name("rq")
    await other.create_stream(StreamSpec(name, (f"{name.replace('-', '_')}.>",)))
    group = unique_name("g")
    await (await other.consumer(name, ConsumerSpec(group))).close()
    listed = await env.t.list_streams()  # created elsewhere a moment ago: listed all the same
    assert {name, f"{name}-{group}-dlq"} <= set(listed) and listed == sorted(listed)
    await other.delete_stream(name)
    assert not [s for s in await env.t.list_streams() if s.startswith(name)]
