"""The transport conformance suite: one set of behaviours every transport must show.

Subclass `TransportConformance` in a test module, say how to open your transport, and pytest
runs every case; a case whose capability the transport does not declare checks instead that
the feature is refused with `UnsupportedFeatureError` (never silently ignored)::

    from pigeon.testing.conformance import TransportConformance

    class TestMyTransport(TransportConformance):
        url = "mything://localhost"

Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``). Every case uses fresh names and
deletes what it created. Timings are short but generous enough for a loaded machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ..engine.config import StartAt
from ..errors import NoRespondersError, RequestTimeoutError, StreamNotFoundError, UnsupportedFeatureError
from ..message import Headers, Message
from ..transport import connect
from ..transport.base import ConsumerSpec, Received, StreamSpec, Transport
from .services import unique_name

__all__ = ["TransportConformance"]


async def drain(
    consumer: Any, expected: int, *, timeout: float = 10.0, ack: bool = True, batch: int = 100
) -> list[Received]:
    """Fetch (and ack) until ``expected`` messages arrived or ``timeout`` passed."""
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        wanted = min(batch, expected - len(got))
        for received in await consumer.fetch(wanted, min(1.0, max(0.05, deadline - time.monotonic()))):
            got.append(received)
            if ack:
                await received.ack()
    return got


async def drain_all(consumers: list[Any], expected: int, *, timeout: float = 10.0) -> list[list[Received]]:
    """Fetch and ack with every consumer at once until together they got ``expected``."""
    got: list[list[Received]] = [[] for _ in consumers]
    deadline = time.monotonic() + timeout

    async def work(index: int) -> None:
        while sum(map(len, got)) < expected and time.monotonic() < deadline:
            for received in await consumers[index].fetch(50, 0.2):
                got[index].append(received)
                await received.ack()

    await asyncio.gather(*(work(i) for i in range(len(consumers))))
    return got


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


class TransportConformance:
    """The cases. Set ``url`` (and ``options``), or override `make_transport`."""

    url: str = ""
    options: Any = None
    # Whether `restart_broker` can restart the engine under a live test (then the reconnect
    # case runs).
    restartable: bool = False

    async def make_transport(self) -> Transport:
        return await connect(self.url, self.options)

    async def restart_broker(self, transport: Transport) -> Transport:
        """Restart the engine; return a transport usable afterwards (override when restartable)."""
        raise NotImplementedError

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        transport = await self.make_transport()
        self._created: list[str] = []
        try:
            yield transport
        finally:
            for stream in self._created:
                with contextlib.suppress(Exception):
                    await transport.delete_stream(stream)
            await transport.close()

    async def stream(self, transport: Transport, partitions: int = 1, **limits: Any) -> tuple[str, str]:
        """A fresh stream; returns (stream name, its subject prefix)."""
        name = unique_name("cs")
        prefix = name.replace("-", "_")
        await transport.create_stream(StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits))
        self._created.append(name)
        return name, prefix

    @staticmethod
    def has(transport: Transport, *capabilities: str) -> bool:
        return all(getattr(transport.capabilities, c) for c in capabilities)

    # -- core messaging ---------------------------------------------------------------------

    async def test_publish_subscribe_keeps_payload_and_headers(self, transport: Transport) -> None:
        subject = f"{unique_name('core').replace('-', '_')}.created"
        subscription = await transport.subscribe(subject)
        await asyncio.sleep(0.1)  # let the subscription reach the broker
        payload = bytes(range(256)) * 4
        await transport.publish(subject, payload, headers={"trace": "abc", "x-Empty": ""})
        received = await subscription.next(5)
        assert received.subject == subject
        assert received.payload == payload
        assert received.headers["trace"] == "abc"
        assert received.headers["x-Empty"] == ""
        await subscription.unsubscribe()

    async def test_many_subjects_do_not_leak(self, transport: Transport) -> None:
        base = unique_name("leak").replace("-", "_")
        subscriptions = {i: await transport.subscribe(f"{base}.t{i}") for i in range(10)}
        await asyncio.sleep(0.1)
        for round_ in range(3):
            for i in range(10):
                await transport.publish(f"{base}.t{i}", f"{i}:{round_}".encode())
        for i, subscription in subscriptions.items():
            got = [(await subscription.next(5)).payload for _ in range(3)]
            assert got == [f"{i}:{r}".encode() for r in range(3)]
            with pytest.raises(TimeoutError):
                await subscription.next(0.2)
            await subscription.unsubscribe()

    async def test_wildcards(self, transport: Transport) -> None:
        base = unique_name("wild").replace("-", "_")
        if not self.has(transport, "wildcards"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.subscribe(f"{base}.*")
            return
        one = await transport.subscribe(f"{base}.*.created")
        rest = await transport.subscribe(f"{base}.>")
        await asyncio.sleep(0.1)
        for subject in (f"{base}.eu.created", f"{base}.eu.deleted", f"{base}.eu.x.created"):
            await transport.publish(subject, subject.encode())
        assert (await one.next(5)).subject == f"{base}.eu.created"
        with pytest.raises(TimeoutError):
            await one.next(0.3)
        assert sorted([(await rest.next(5)).subject for _ in range(3)]) == sorted(
            [f"{base}.eu.created", f"{base}.eu.deleted", f"{base}.eu.x.created"]
        )
        await one.unsubscribe()
        await rest.unsubscribe()

    async def test_queue_groups_share_core_messages(self, transport: Transport) -> None:
        subject = f"{unique_name('queue').replace('-', '_')}.work"
        if not self.has(transport, "queue_groups"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.subscribe(subject, queue="workers")
            return
        members = [await transport.subscribe(subject, queue="workers") for _ in range(3)]
        await asyncio.sleep(0.2)
        for i in range(30):
            await transport.publish(subject, str(i).encode())
        got: list[list[bytes]] = [[] for _ in members]
        for index, member in enumerate(members):
            while True:
                try:
                    got[index].append((await member.next(0.5)).payload)
                except TimeoutError:
                    break
        everything = sorted(p for g in got for p in g)
        assert everything == sorted(str(i).encode() for i in range(30)), "each message to exactly one member"
        assert sum(1 for g in got if g) >= 2, "the load is shared"
        for member in members:
            await member.unsubscribe()

    async def test_request_reply_timeout_and_no_responders(self, transport: Transport) -> None:
        subject = f"{unique_name('svc').replace('-', '_')}.echo"
        if not self.has(transport, "request_reply"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.request(subject, b"x", timeout=0.5)
            return
        service = await transport.subscribe(subject)
        await asyncio.sleep(0.1)

        async def answer() -> None:
            request = await service.next(5)
            await transport.reply(request, request.payload.upper(), headers={"served-by": "echo"})

        task = asyncio.create_task(answer())
        reply = await transport.request(subject, b"ping", timeout=5)
        await task
        assert reply.payload == b"PING"
        assert reply.headers["served-by"] == "echo"
        await service.unsubscribe()
        silent = await transport.subscribe(f"{subject}.silent")
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await transport.request(f"{subject}.silent", b"x", timeout=0.3)
        assert time.monotonic() - started >= 0.25
        await silent.unsubscribe()
        nobody = f"{subject}.nobody"
        if self.has(transport, "no_responders"):
            started = time.monotonic()
            with pytest.raises(NoRespondersError):
                await transport.request(nobody, b"x", timeout=5)
            assert time.monotonic() - started < 2, "no responders is reported at once"
        else:
            with pytest.raises(RequestTimeoutError):
                await transport.request(nobody, b"x", timeout=0.3)

    # -- streams ----------------------------------------------------------------------------

    async def test_publish_to_a_stream_returns_acks_and_reaches_core_subscribers(
        self, transport: Transport
    ) -> None:
        stream, prefix = await self.stream(transport)
        watcher = await transport.subscribe(f"{prefix}.>")
        await asyncio.sleep(0.1)
        acks = [await transport.publish(f"{prefix}.e", str(i).encode()) for i in range(5)]
        assert all(a is not None and a.stream == stream and not a.duplicate for a in acks)
        offsets = [a.offset for a in acks if a is not None]
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
        assert [(await watcher.next(5)).payload for _ in range(5)] == [str(i).encode() for i in range(5)]
        assert await transport.publish(f"{unique_name('free').replace('-', '_')}.x", b"core only") is None
        state = await transport.stream_state(stream)
        assert state.messages == 5
        await watcher.unsubscribe()

    async def test_list_and_purge_streams(self, transport: Transport) -> None:
        partitions = 2 if self.has(transport, "partitions") else 1
        stream, prefix = await self.stream(transport, partitions=partitions)
        assert stream in await transport.list_streams()
        shared = await transport.consumer(stream, ConsumerSpec(unique_name("s"), ack_wait_s=10))
        ordered = await transport.consumer(
            stream, ConsumerSpec(unique_name("o"), kind="ordered", ack_wait_s=10)
        )
        for i in range(6):
            await transport.publish(f"{prefix}.old", f"old{i}".encode(), key=f"k{i}")
        assert len(await drain(shared, 2)) == 2, "the shared group had settled part of the stream"
        await transport.purge_stream(stream)
        assert (await transport.stream_state(stream)).messages == 0
        for i in range(4):
            await transport.publish(f"{prefix}.new", f"new{i}".encode(), key=f"k{i}")
        for consumer in (shared, ordered):
            got = await drain(consumer, 5, timeout=3)
            assert sorted(r.message.payload for r in got) == [f"new{i}".encode() for i in range(4)]
            await consumer.close()
        await transport.delete_stream(stream)
        assert stream not in await transport.list_streams()
        with pytest.raises(StreamNotFoundError):
            await transport.purge_stream(stream)

    async def test_concurrent_publishers_and_consumers_lose_nothing(self, transport: Transport) -> None:
        stream, prefix = await self.stream(
            transport, partitions=2 if self.has(transport, "partitions") else 1
        )
        spec = ConsumerSpec(unique_name("g"), ack_wait_s=10)
        consumers = [await transport.consumer(stream, spec) for _ in range(3)]

        async def publisher(n: int) -> None:
            for i in range(50):
                await transport.publish(f"{prefix}.p{n}", f"{n}-{i}".encode(), key=f"k{i % 7}")

        await asyncio.gather(*(publisher(n) for n in range(4)))
        results = await drain_all(consumers, 200, timeout=15)
        payloads = sorted(r.message.payload for got in results for r in got)
        assert payloads == sorted(f"{n}-{i}".encode() for n in range(4) for i in range(50))
        for consumer in consumers:
            await consumer.close()

    async def test_two_groups_each_get_everything(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        for i in range(20):
            await transport.publish(f"{prefix}.x", str(i).encode())
        for group in ("a", "b"):
            consumer = await transport.consumer(stream, ConsumerSpec(unique_name(group)))
            got = await drain(consumer, 20)
            assert sorted(int(r.message.payload) for r in got) == list(range(20))
            await consumer.close()

    async def test_competing_consumers_share_the_load(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        spec = ConsumerSpec(unique_name("g"), ack_wait_s=10)
        first, second = [await transport.consumer(stream, spec) for _ in range(2)]
        for i in range(40):
            await transport.publish(f"{prefix}.job", str(i).encode())
        got_first = await first.fetch(20, 5)
        got_second = await second.fetch(20, 5)
        assert got_first and got_second, "both members got work"
        assert not {r.message.payload for r in got_first} & {r.message.payload for r in got_second}
        for received in [*got_first, *got_second]:
            await received.ack()
        await first.close()
        await second.close()

    async def test_nack_causes_redelivery(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        consumer = await transport.consumer(stream, ConsumerSpec(unique_name("g"), ack_wait_s=10))
        await transport.publish(f"{prefix}.x", b"retry me")
        (first,) = await consumer.fetch(1, 5)
        assert first.delivery_count == 1
        await first.nack(error=ValueError("transient"))
        again = await drain(consumer, 1, ack=False)
        assert [r.message.payload for r in again] == [b"retry me"]
        assert again[0].delivery_count == 2
        await again[0].ack()
        assert await consumer.fetch(1, 0.5) == []
        await consumer.close()

    async def test_delayed_nack_waits_at_least_its_delay(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        consumer = await transport.consumer(stream, ConsumerSpec(unique_name("g"), ack_wait_s=10))
        await transport.publish(f"{prefix}.x", b"later")
        (first,) = await consumer.fetch(1, 5)
        if not self.has(transport, "delayed_nack"):
            with pytest.raises(UnsupportedFeatureError):
                await first.nack(delay=1.0)
            await first.ack()
            await consumer.close()
            return
        nacked_at = time.monotonic()
        await first.nack(delay=1.0)
        again = await drain(consumer, 1, ack=False, timeout=10)
        waited = time.monotonic() - nacked_at
        assert again and again[0].message.payload == b"later"
        assert waited >= 0.95, f"redelivered after {waited:.2f}s, before its 1s delay"
        await again[0].ack()
        await consumer.close()

    async def test_ack_timeout_redelivers(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        spec = ConsumerSpec(unique_name("g"), ack_wait_s=1.0)
        consumer = await transport.consumer(stream, spec)
        await transport.publish(f"{prefix}.x", b"forgotten")
        (first,) = await consumer.fetch(1, 5)
        if not self.has(transport, "ack_timeout"):
            await first.ack()
            await consumer.close()
            return
        again = await drain(consumer, 1, ack=False, timeout=10)
        assert again and again[0].message.payload == b"forgotten"
        assert again[0].delivery_count == 2
        await again[0].ack()
        await consumer.close()

    async def test_subscriber_restart_loses_nothing(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        spec = ConsumerSpec(unique_name("g"), ack_wait_s=2)
        consumer = await transport.consumer(stream, spec)
        for i in range(10):
            await transport.publish(f"{prefix}.x", str(i).encode())
        done = await drain(consumer, 4)  # acked
        held = await consumer.fetch(3, 5)  # received, never acked
        assert held
        await consumer.close()
        replacement = await transport.consumer(stream, spec)
        rest = await drain(replacement, 10 - len(done), timeout=15)
        assert sorted(int(r.message.payload) for r in [*done, *rest]) == list(range(10))
        await replacement.close()

    async def test_publisher_close_flushes_everything(self, transport: Transport) -> None:
        if not self.has(transport, "durable"):
            pytest.skip(f"{transport.name} keeps nothing after close")
        stream, prefix = await self.stream(transport)
        self._created.remove(stream)
        await transport.close()  # one connection at a time: the embedded engine allows no more
        publisher = await self.make_transport()
        for i in range(100):
            await publisher.publish(f"{prefix}.x", str(i).encode())
        await publisher.close()
        reader = await self.make_transport()
        try:
            consumer = await reader.consumer(stream, ConsumerSpec(unique_name("g")))
            got = await drain(consumer, 100)
            assert sorted(int(r.message.payload) for r in got) == list(range(100))
            await consumer.close()
        finally:
            await reader.delete_stream(stream)
            await reader.close()
        self._created = []
        transport.close = _noop  # type: ignore[method-assign]

    async def test_dedup_by_message_id(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        if not self.has(transport, "dedup"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.publish(f"{prefix}.x", b"once", msg_id="order-1")
            return
        first = await transport.publish(f"{prefix}.x", b"once", msg_id="order-1")
        second = await transport.publish(f"{prefix}.x", b"once", msg_id="order-1")
        assert first is not None and second is not None
        assert not first.duplicate and second.duplicate
        assert (second.partition, second.offset) == (first.partition, first.offset)
        assert (await transport.stream_state(stream)).messages == 1

    async def test_dead_letter_after_max_deliveries_with_failure_headers(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        group = unique_name("g")
        if not self.has(transport, "max_deliver", "dead_letters"):
            with pytest.raises(UnsupportedFeatureError):
                consumer = await transport.consumer(stream, ConsumerSpec(group, max_deliver=2))
                await transport.read_dead_letters(stream, group)
            return
        consumer = await transport.consumer(stream, ConsumerSpec(group, max_deliver=2, ack_wait_s=10))
        await transport.publish(f"{prefix}.poison", b"bad", key="k1", headers={"origin": "test"})
        for attempt in (1, 2):
            got = await drain(consumer, 1, ack=False)
            assert got and got[0].delivery_count == attempt
            await got[0].nack(error=ValueError(f"broken {attempt}"))
        assert await consumer.fetch(1, 1.0) == [], "no delivery after max_deliver"
        letters: list[Message] = []

        async def arrived() -> bool:
            letters[:] = await transport.read_dead_letters(stream, group)
            return bool(letters)

        assert await eventually(arrived)
        (letter,) = letters
        assert letter.payload == b"bad"
        assert letter.headers["origin"] == "test"
        assert letter.headers[Headers.ERROR_TYPE] == "ValueError"
        assert letter.headers[Headers.ERROR_MESSAGE] == "broken 2"
        assert letter.headers[Headers.DELIVERY_COUNT] == "2"
        assert letter.headers[Headers.GROUP] == group
        assert letter.headers[Headers.ORIGINAL_STREAM] == stream
        assert letter.headers[Headers.ORIGINAL_SUBJECT] == f"{prefix}.poison"
        assert letter.headers[Headers.FIRST_FAILURE_AT] <= letter.headers[Headers.LAST_FAILURE_AT]
        await consumer.close()

    async def test_deleting_a_stream_deletes_its_dead_letters(self, transport: Transport) -> None:
        if not self.has(transport, "dead_letters"):
            return
        stream, prefix = await self.stream(transport)
        consumer = await transport.consumer(stream, ConsumerSpec("g", ack_wait_s=10))
        await transport.publish(f"{prefix}.x", b"doomed")
        (received,) = await drain(consumer, 1, ack=False)
        await received.term("no")
        assert await eventually(lambda: _has_letters(transport, stream, "g"))
        await consumer.close()
        await transport.delete_stream(stream)
        await transport.create_stream(StreamSpec(stream, (f"{prefix}.>",)))
        consumer = await transport.consumer(stream, ConsumerSpec("g", ack_wait_s=10))
        assert await transport.read_dead_letters(stream, "g") == [], "a new stream starts without old letters"
        await consumer.close()

    async def test_replay_from_the_start_and_from_a_time(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        for i in range(5):
            await transport.publish(f"{prefix}.x", f"old{i}".encode())
        await asyncio.sleep(1.1)
        boundary = time.time()
        await asyncio.sleep(0.1)
        for i in range(5):
            await transport.publish(f"{prefix}.x", f"new{i}".encode())
        if not self.has(transport, "replay_offset"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.consumer(stream, ConsumerSpec(unique_name("r"), start=StartAt.offset(0)))
        else:
            consumer = await transport.consumer(
                stream, ConsumerSpec(unique_name("r"), start=StartAt.earliest())
            )
            got = await drain(consumer, 10)
            assert [r.message.payload for r in got] == [f"old{i}".encode() for i in range(5)] + [
                f"new{i}".encode() for i in range(5)
            ]
            await consumer.close()
        if not self.has(transport, "replay_time"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.consumer(stream, ConsumerSpec(unique_name("t"), start=StartAt.time(boundary)))
            return
        consumer = await transport.consumer(
            stream, ConsumerSpec(unique_name("t"), start=StartAt.time(boundary))
        )
        got = await drain(consumer, 5)
        assert [r.message.payload for r in got] == [f"new{i}".encode() for i in range(5)]
        await consumer.close()

    async def test_ordered_group_holds_back_while_the_only_message_is_unacked(
        self, transport: Transport
    ) -> None:
        stream, prefix = await self.stream(transport)
        group = unique_name("o")
        if not self.has(transport, "ordered_groups"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.consumer(stream, ConsumerSpec(group, kind="ordered"))
            return
        consumer = await transport.consumer(stream, ConsumerSpec(group, kind="ordered"))
        await transport.publish(f"{prefix}.x", b"first")
        (first,) = await consumer.fetch(10, 5)
        await transport.publish(f"{prefix}.x", b"second")
        assert await consumer.fetch(10, 1.0) == [], "nothing new while the first is unacked"
        await first.ack()
        got = await drain(consumer, 1)
        assert [r.message.payload for r in got] == [b"second"]
        await consumer.close()

    async def test_per_key_order_across_many_consumers(self, transport: Transport) -> None:
        if not self.has(transport, "per_key_order"):
            pytest.skip(f"{transport.name} does not keep per-key order")
        partitions = 4 if self.has(transport, "partitions") else 1
        stream, prefix = await self.stream(transport, partitions=partitions)
        if self.has(transport, "ordered_groups"):
            spec = ConsumerSpec(unique_name("o"), kind="ordered")
        else:
            spec = ConsumerSpec(unique_name("k"), key_ordered=True, ack_wait_s=10)
        consumers = [await transport.consumer(stream, spec) for _ in range(3)]
        keys = [f"key{k}" for k in range(8)]
        for i in range(20):
            for key in keys:
                await transport.publish(f"{prefix}.e", f"{key}:{i}".encode(), key=key)
        seen: dict[str, list[int]] = {key: [] for key in keys}

        async def work(consumer: Any) -> None:
            deadline = time.monotonic() + 20
            while sum(map(len, seen.values())) < 160 and time.monotonic() < deadline:
                for received in await consumer.fetch(10, 0.5):
                    key, i = received.message.payload.decode().split(":")
                    seen[key].append(int(i))
                    await asyncio.sleep(0.001)  # let the others interleave
                    await received.ack()

        await asyncio.gather(*(work(c) for c in consumers))
        for key in keys:
            assert seen[key] == list(range(20)), f"{key} out of order: {seen[key]}"
        for consumer in consumers:
            await consumer.close()

    async def test_idle_members_beyond_the_partition_count(self, transport: Transport) -> None:
        if not self.has(transport, "ordered_groups", "partitions"):
            pytest.skip(f"{transport.name} has no partitioned ordered groups")
        stream, prefix = await self.stream(transport, partitions=2)
        spec = ConsumerSpec(unique_name("o"), kind="ordered")
        consumers = [await transport.consumer(stream, spec) for _ in range(3)]
        for i in range(40):
            await transport.publish(f"{prefix}.e", str(i).encode(), key=f"k{i}")
        results = await drain_all(consumers, 40, timeout=15)
        assert sum(map(len, results)) == 40
        assert sum(1 for got in results if got) == 2, "one member per partition; the third is idle"
        for consumer in consumers:
            await consumer.close()

    async def test_lag_counts_what_the_group_has_not_finished(self, transport: Transport) -> None:
        stream, prefix = await self.stream(transport)
        group = unique_name("g")
        consumer = await transport.consumer(stream, ConsumerSpec(group))
        if not self.has(transport, "lag"):
            with pytest.raises(UnsupportedFeatureError):
                await transport.lag(stream, group)
            await consumer.close()
            return
        for i in range(10):
            await transport.publish(f"{prefix}.x", str(i).encode())

        async def lag_is(n: int) -> bool:
            return sum(p.lag for p in await transport.lag(stream, group)) == n

        assert await eventually(lambda: lag_is(10))
        await drain(consumer, 4)
        assert await eventually(lambda: lag_is(6))
        await drain(consumer, 6)
        assert await eventually(lambda: lag_is(0))
        await consumer.close()

    async def test_reconnect_after_the_broker_restarts(self, transport: Transport) -> None:
        if not self.restartable or not self.has(transport, "durable"):
            pytest.skip("this run cannot restart the broker")
        stream, prefix = await self.stream(transport)
        for i in range(5):
            await transport.publish(f"{prefix}.x", str(i).encode())
        transport = await self.restart_broker(transport)
        for i in range(5, 10):
            await transport.publish(f"{prefix}.x", str(i).encode())
        consumer = await transport.consumer(stream, ConsumerSpec(unique_name("g")))
        got = await drain(consumer, 10)
        assert sorted(int(r.message.payload) for r in got) == list(range(10))
        await consumer.close()


async def _has_letters(transport: Transport, stream: str, group: str) -> bool:
    return bool(await transport.read_dead_letters(stream, group))


async def _noop() -> None:
    return None
