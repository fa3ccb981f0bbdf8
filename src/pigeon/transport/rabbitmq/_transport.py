"""`RabbitMQTransport`: connection, registry, publishing, streams, groups, lag, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...engine.config import validate_name
from ...engine.groups.deadletter import dead_letter_subject
from ...engine.murmur2 import partition_for_key
from ...engine.stream import PubAck
from ...errors import (
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidMessageError,
    PigeonError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from ...message import Message, new_id
from ...subjects import validate_subject
from ..base import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    PartitionLag,
    StreamSpec,
    StreamState,
    Subscription,
    Transport,
)
from . import _archive
from ._channel import Chan, is_connection_error, open_chan, unexpected
from ._codec import (
    CORE_WORD,
    H_PURGES,
    check_headers,
    check_payload,
    decode,
    properties,
    routing_key,
)
from ._core import Core
from ._groups import Groups
from ._options import Names, RabbitMQOptions
from ._ordered import OrderedConsumer
from ._registry import (
    Registry,
    StreamEntry,
    stream_spec_to_json,
)
from ._shared import SharedConsumer

EMULATED = frozenset(
    {
        "partitions",
        "ordered_groups",
        "per_key_order",
        "delayed_nack",
        "ack_timeout",
        "in_progress",
        "max_deliver",
        "dead_letters",
        "replay_offset",
        "replay_time",
        "lag",
    }
)

_NO_DEDUP = (
    "RabbitMQ has no message deduplication; make consumers idempotent (every message carries "
    "its id), or use the nats://, redis:// or file:// transport"
)

log = logging.getLogger("pigeon.transport.rabbitmq")

# The registry's log and its snapshots: bounded, in small segments (retention drops whole
# ones). Snapshots every few hundred records keep far more than one of them in range.
_META_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-length-bytes": 64 * 1024 * 1024,
    "x-stream-max-segment-size-bytes": 4 * 1024 * 1024,
}


class RabbitMQTransport(Transport):
    name = "rabbitmq"
    capabilities = Capabilities(
        durable=True,
        wildcards=True,
        queue_groups=True,
        request_reply=True,
        no_responders=True,
        partitions=True,
        ordered_groups=True,
        shared_groups=True,
        per_key_order=True,
        delayed_nack=True,
        ack_timeout=True,
        in_progress=True,
        max_deliver=True,
        dead_letters=True,
        dedup=False,
        replay_offset=True,
        replay_time=True,
        lag=True,
        emulated=EMULATED,
    )
    emulation_notes: ClassVar[dict[str, str]] = {
        "partitions": "one stream queue per partition, bound to the stream's topic exchange by a "
        "partition word the publisher puts first in the routing key (murmur2 of the key)",
        "ordered_groups": "per partition a single-active-consumer quorum queue holding a token "
        "decides the reader; members balance partitions by heartbeats on a fanout exchange and "
        "read the stream queue in offset order, committing to a one-message queue",
        "per_key_order": "through ordered groups (keyed messages stay in their partition)",
        "delayed_nack": "the message is copied into a retry queue (one per power-of-two delay) "
        "with a per-message expiration, which dead-letters it back into the group's queue",
        "ack_timeout": "a timer in the member requeues a message not settled within ack_wait_s",
        "in_progress": "restarts that timer",
        "max_deliver": "deliveries are counted from a header on retry copies plus RabbitMQ's "
        "x-delivery-count; x-delivery-limit is set above it as a backstop",
        "dead_letters": "pigeon publishes the dead letter, with its failure headers, into the "
        "stream <stream>-<group>-dlq; the group's queue also dead-letters there (DLX) as a backstop",
        "replay_offset": "ordered groups start their stream queue readers at the offset; a new "
        "shared group's queue is filled from the stream queues before it is used",
        "replay_time": "the same, starting at the stream queue's timestamp",
        "lag": "queue depths by passive declare; messages in flight are known only for this "
        "process's members (AMQP does not report unacknowledged counts)",
    }

    def __init__(
        self, connection: aio_pika.abc.AbstractConnection, url: str, options: RabbitMQOptions
    ) -> None:
        self.url = url
        self.options = options
        self.names = Names(options.prefix)
        self._connection = connection
        self._publisher: Chan | None = None
        self._admin: Chan | None = None
        self._meta: Chan | None = None
        self.registry = Registry(
            self._append_record, self._write_snapshot, max(10.0, options.connect_timeout_s)
        )
        self.core = Core(self.open_chan, self.names, options, self._publish_core)
        self._sequences: dict[tuple[str, int], int] = {}
        self._round_robin: dict[str, int] = {}
        self.consumers: set[SharedConsumer | OrderedConsumer] = set()
        self.groups = Groups(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- connection -----------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, options: Any = None) -> RabbitMQTransport:
        if options is None:
            options = RabbitMQOptions()
        elif not isinstance(options, RabbitMQOptions):
            raise InvalidConfigError(f"options must be a RabbitMQOptions, not {type(options).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise InvalidConfigError(f"not an AMQP URL: {url!r}; use amqp://user:password@host:port/vhost")
        try:
            connection = await aio_pika.connect(url, timeout=options.connect_timeout_s)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as error:
            raise TransportClosedError(
                f"cannot connect to RabbitMQ at {parts.hostname}:{parts.port}: {error!r}"
            ) from None
        except ValueError as error:
            raise InvalidConfigError(f"bad AMQP URL {url!r}: {error}") from None
        transport = cls(connection, url, options)
        try:
            await transport._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return transport

    async def _start(self) -> None:
        admin = await self._admin_chan()
        names = self.names
        try:
            await admin.raw.exchange_declare(names.core, exchange_type="topic", durable=True)
            for queue in (names.meta, names.snapshots):
                await admin.raw.queue_declare(queue, durable=True, arguments=_META_ARGUMENTS)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, "declaring pigeon's exchange and registry") from None
        try:
            snapshot = await _archive.last(self.open_chan, names.snapshots, self.options.probe_timeout_s)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, "reading the registry") from None
        start: int | str = "first"
        if snapshot is not None:
            self.registry.load(json.loads(snapshot.body))
            start = self.registry.offset + 1
        self._meta = meta = await self.open_chan()

        async def on_record(delivered: DeliveredMessage) -> None:
            self.registry.apply(delivered)  # before any await: records apply in log order
            if not meta.closed:
                with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                    await meta.raw.basic_ack(delivered.delivery_tag or 0, wait=False)

        await meta.raw.basic_qos(prefetch_count=1000)
        await meta.raw.basic_consume(names.meta, on_record, arguments={"x-stream-offset": start})
        meta.raw.closing.add_done_callback(self._on_meta_closed)
        await self.registry.sync()

    def _write_snapshot(self, body: bytes) -> None:
        props = Basic.Properties(delivery_mode=2, content_type="application/json")
        self.spawn(self.publish_confirmed("", self.names.snapshots, body, props))

    def _on_meta_closed(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        self.registry.fail(error or TransportClosedError("the registry channel was closed"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in list(self.consumers):
            with contextlib.suppress(Exception):
                await consumer.close()
        await self.core.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._connection.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("the rabbitmq transport is closed")
        if self._connection.is_closed:
            raise TransportClosedError("the rabbitmq transport lost its connection")

    async def open_chan(self) -> Chan:
        self._check_open()
        return await open_chan(self._connection)

    async def _admin_chan(self) -> Chan:
        if self._admin is None or self._admin.closed:
            self._admin = await open_chan(self._connection)
        return self._admin

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            error = task.exception()
            if not isinstance(error, TransportClosedError) and not is_connection_error(error or Exception()):
                log.warning("background task failed: %r", error)

    def forget(self, consumer: SharedConsumer | OrderedConsumer) -> None:
        self.consumers.discard(consumer)

    # -- publishing --------------------------------------------------------------------------------

    async def publish_confirmed(
        self, exchange: str, key: str, body: bytes, props: Basic.Properties, *, mandatory: bool = False
    ) -> None:
        """Publish and wait for the broker's confirm. Lets aiormq's PublishError (returned,
        ``mandatory``) and ChannelNotFoundEntity (no such exchange) through for the caller."""
        self._check_open()
        if self._publisher is None or self._publisher.closed:
            self._publisher = await open_chan(self._connection, confirms=True, returns=True)
        chan = self._publisher
        try:
            await chan.raw.basic_publish(
                body, exchange=exchange, routing_key=key, properties=props, mandatory=mandatory
            )
        except (aiormq.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity):
            raise
        except aiormq.exceptions.DeliveryError as error:
            raise PigeonError(f"RabbitMQ refused to store a message for {key!r}: {error!r}") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"publishing to {key!r}") from None

    async def _publish_core(self, body: bytes, key: str, props: Basic.Properties, mandatory: bool) -> None:
        await self.publish_confirmed(self.names.core, key, body, props, mandatory=mandatory)

    def _route(
        self, subject: str, payload: bytes, key: str | None, headers: Mapping[str, str] | None
    ) -> tuple[str, str, bytes, Basic.Properties, PubAck | None]:
        """Where a publish goes: (exchange, routing key, body, properties, its ack)."""
        validate_subject(subject)
        body = check_payload(payload)
        table: dict[str, Any] | None = check_headers(headers)
        if key is not None and not isinstance(key, str):
            raise InvalidMessageError(f"key must be a str, not {type(key).__name__}")
        entry = self.registry.route(subject)
        if entry is None:
            props = properties(new_id(), table, key, time.time(), persistent=False)
            return self.names.core, routing_key(CORE_WORD, subject), body, props, None
        stream = entry.spec
        if key is not None:
            partition = partition_for_key(key.encode(), stream.partitions)
        else:
            partition = self._round_robin.get(stream.name, 0)
            self._round_robin[stream.name] = (partition + 1) % stream.partitions
        rk = routing_key(str(partition), subject)
        if entry.purges:
            table = {**(table or {}), H_PURGES: entry.purges}
        sequence = self._sequences.get((stream.name, partition), 0)
        self._sequences[(stream.name, partition)] = sequence + 1
        props = properties(new_id(), table, key, time.time(), persistent=True)
        return (
            self.names.stream_exchange(stream.name),
            rk,
            body,
            props,
            PubAck(stream.name, partition, sequence),
        )

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        self._check_open()
        if msg_id is not None:
            raise UnsupportedFeatureError(self.name, "dedup", _NO_DEDUP)
        for attempt in range(2):
            exchange, rk, body, props, ack = self._route(subject, payload, key, headers)
            try:
                await self.publish_confirmed(exchange, rk, body, props)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # Another process deleted the stream; this registry had not seen it yet.
                if attempt:
                    raise TransportClosedError(f"the exchange {exchange!r} keeps vanishing") from None
                await self.registry.sync()
                continue
            return ack
        raise AssertionError("unreachable")

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        """Publish with confirms pipelined: the batch waits for its confirms once, not each."""
        self._check_open()
        if any(m.has_explicit_id for m in messages):
            raise UnsupportedFeatureError(self.name, "dedup", _NO_DEDUP)
        routed = [self._route(m.subject, m.payload, m.key, m.headers) for m in messages]
        # Tasks start in creation order, so the publishes reach the channel in batch order.
        tasks = [
            asyncio.ensure_future(self.publish_confirmed(exchange, rk, body, props))
            for exchange, rk, body, props, _ in routed
        ]
        try:
            await asyncio.gather(*tasks)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.registry.sync()
            raise StreamNotFoundError("a stream of this batch was deleted while it was published") from None
        return [ack for *_, ack in routed]

    # -- core messaging ------------------------------------------------------------------------------

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        self._check_open()
        return await self.core.subscribe(pattern, queue)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        self._check_open()
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return await self.core.request(subject, payload, headers, timeout)

    # -- the registry ----------------------------------------------------------------------------------

    async def _append_record(self, body: bytes) -> None:
        props = Basic.Properties(delivery_mode=2, content_type="application/json")
        await self.publish_confirmed("", self.names.meta, body, props)

    async def _stream(self, name: str) -> StreamEntry:
        validate_name(name)
        entry = self.registry.streams.get(name)
        if entry is None:
            await self.registry.sync()
            entry = self.registry.streams.get(name)
        if entry is None:
            raise StreamNotFoundError(f"no stream named {name!r}")
        return entry

    @contextlib.asynccontextmanager
    async def lock(self, what: str) -> AsyncIterator[None]:
        """A lock across processes: an exclusive queue, which only one connection can hold
        (and which disappears with it)."""
        name = self.names.lock(what)
        deadline = time.monotonic() + self.options.lock_timeout_s
        while True:
            chan = await self.open_chan()  # a refused declare closes the channel
            try:
                await chan.raw.queue_declare(name, exclusive=True, auto_delete=True)
                break
            except aiormq.exceptions.ChannelLockedResource:
                await chan.close()
                if time.monotonic() > deadline:
                    raise PigeonError(f"{what} stayed locked for {self.options.lock_timeout_s}s") from None
                await asyncio.sleep(0.05)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
                await chan.close()
                raise unexpected(error, f"locking {what}") from None
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await chan.raw.queue_delete(name)
            await chan.close()

    async def admin_call(self, what: str, calls: Sequence[Any]) -> None:
        """Run declarations in order on the admin channel; a refusal closes only that channel."""
        chan = await self._admin_chan()
        try:
            for call in calls:
                await call(chan.raw)
        except aiormq.exceptions.ChannelPreconditionFailed as error:
            raise StreamExistsError(
                f"{what}: RabbitMQ holds objects of the same name with other settings (left over "
                f"from an earlier stream or group?): {error}"
            ) from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, what) from None

    # -- streams ------------------------------------------------------------------------------------

    async def create_stream(self, spec: StreamSpec) -> None:
        self._check_open()
        if not isinstance(spec, StreamSpec):
            raise InvalidConfigError(f"create_stream needs a StreamSpec, not {type(spec).__name__}")
        _check_limits(spec)
        await self.registry.sync()
        if self._exists(spec):
            return
        await self._declare_stream(spec)
        if not await self.registry.append({"op": "stream", "spec": stream_spec_to_json(spec)}):
            self._exists(spec)  # lost a race: fine if the winner is the same stream

    def _exists(self, spec: StreamSpec) -> bool:
        """True when the stream exists as ``spec``; raises when it conflicts."""
        existing = self.registry.streams.get(spec.name)
        if existing is not None:
            if existing.spec != spec:
                raise StreamExistsError(f"stream {spec.name!r} exists with a different configuration")
            return True
        other = self.registry.overlapping(spec)
        if other is not None:
            raise SubjectOverlapError(
                f"stream {spec.name!r}: its subjects {list(spec.subjects)} overlap those of stream "
                f"{other.name!r} {list(other.spec.subjects)}"
            )
        return False

    async def _declare_stream(self, spec: StreamSpec) -> None:
        names = self.names
        exchange = names.stream_exchange(spec.name)
        arguments: dict[str, Any] = {"x-queue-type": "stream"}
        if spec.max_age_s is not None:
            arguments["x-max-age"] = f"{max(1, math.ceil(spec.max_age_s))}s"
        if spec.max_bytes is not None:
            share = max(1, math.ceil(spec.max_bytes / spec.partitions))
            arguments["x-max-length-bytes"] = share
            # Retention drops whole segments: keep several per partition.
            arguments["x-stream-max-segment-size-bytes"] = max(64 * 1024, min(share // 4, 500_000_000))
        elif spec.max_age_s is not None:
            arguments["x-stream-max-segment-size-bytes"] = 16 * 1024 * 1024
        calls: list[Any] = [
            lambda ch: ch.exchange_declare(exchange, exchange_type="topic", durable=True),
            # Everything stored is also published: core subscribers see it through this binding.
            lambda ch: ch.exchange_bind(names.core, exchange, routing_key="#"),
        ]
        for p in range(spec.partitions):
            queue = names.partition_queue(spec.name, p)
            calls.append(lambda ch, q=queue: ch.queue_declare(q, durable=True, arguments=arguments))
            calls.append(lambda ch, q=queue, p=p: ch.queue_bind(q, exchange, routing_key=f"{p}.#"))
        await self.admin_call(f"creating stream {spec.name!r}", calls)

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        entry = await self._stream(name)
        await self.registry.append({"op": "delete", "name": name})
        for group in list(entry.groups.values()):
            await self.groups.drop(entry, group)
        # The dead letters of its groups go too, also those of groups deleted before (whose
        # dead letters delete_group keeps): streams named and capturing as pigeon names them.
        for other in list(self.registry.streams.values()):
            group_name = other.name.removeprefix(f"{name}-").removesuffix("-dlq")
            if other.name == f"{name}-{group_name}-dlq" and other.spec.subjects == (
                dead_letter_subject(name, group_name),
            ):
                with contextlib.suppress(StreamNotFoundError):
                    await self.delete_stream(other.name)
        names = self.names
        calls: list[Any] = [
            lambda ch, p=p: ch.queue_delete(names.partition_queue(name, p))
            for p in range(entry.spec.partitions)
        ]
        calls.append(lambda ch: ch.exchange_delete(names.stream_exchange(name)))
        await self.admin_call(f"deleting stream {name!r}", calls)

    async def stream_state(self, name: str) -> StreamState:
        self._check_open()
        entry = await self._stream(name)
        spec = entry.spec
        firsts, lasts = await asyncio.gather(
            asyncio.gather(*(self.probe(name, p, "first") for p in range(spec.partitions))),
            asyncio.gather(*(self.probe(name, p, "last") for p in range(spec.partitions))),
        )
        messages = 0
        for p, (first, last) in enumerate(zip(firsts, lasts, strict=True)):
            if last >= 0 <= first:
                messages += max(0, last - max(first, entry.floor(p)) + 1)
        return StreamState(name, spec.subjects, spec.partitions, messages, tuple(lasts))

    async def list_streams(self) -> list[str]:
        self._check_open()
        await self.registry.sync()
        return sorted(self.registry.streams)

    async def purge_stream(self, name: str) -> None:
        """Empty the stream for every group (see "Listing and purging" in the package docs)."""
        self._check_open()
        await self.registry.sync()  # groups created elsewhere a moment ago have queues too
        entry = await self._stream(name)
        # The group queues first: what a publish adds between this and the probes below is
        # then still stamped with the old purge count, so shared groups drop it, as the new
        # floors drop it for readers of the stream queues.
        await self.groups.purge_queues(entry)
        lasts = await asyncio.gather(*(self.probe(name, p, "last") for p in range(entry.spec.partitions)))
        record = {"op": "purge", "stream": name, "floors": [last + 1 for last in lasts]}
        if not await self.registry.append(record):
            raise StreamNotFoundError(f"stream {name!r} was deleted while it was purged")

    async def probe(self, stream: str, p: int, where: str) -> int:
        try:
            return await _archive.probe(
                self.open_chan, self.names.partition_queue(stream, p), where, self.options.probe_timeout_s
            )
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise StreamNotFoundError(f"stream {stream!r} has no partition {p} on RabbitMQ") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"reading stream {stream!r}") from None

    async def read_partition(
        self,
        stream: str,
        p: int,
        start: int | float,
        stop: int,
        handle: Any,
    ) -> None:
        try:
            await _archive.read(
                self.open_chan,
                self.names.partition_queue(stream, p),
                start,
                stop,
                handle,
                quiet_s=max(1.0, self.options.probe_timeout_s * 3),
            )
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise StreamNotFoundError(f"stream {stream!r} has no partition {p} on RabbitMQ") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"reading stream {stream!r}") from None

    # -- groups -----------------------------------------------------------------------------------------

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        self._check_open()
        if not isinstance(spec, ConsumerSpec):
            raise InvalidConfigError(f"consumer needs a ConsumerSpec, not {type(spec).__name__}")
        if spec.key_ordered:
            raise UnsupportedFeatureError(
                self.name,
                "key-ordered shared groups",
                "use an ordered group (kind='ordered'), which keeps every key in order; a RabbitMQ "
                "queue cannot hold one key back while the others flow",
            )
        if member is not None and (not isinstance(member, str) or not member or len(member) > 100):
            raise InvalidConfigError(f"member must be 1 to 100 characters, not {member!r}")
        entry = await self._stream(stream)
        group = entry.groups.get(spec.group)
        if group is None:
            await self.registry.sync()
            group = entry.groups.get(spec.group) or await self.groups.create(entry, spec)
        if group.spec != spec:
            raise GroupExistsError(
                f"group {spec.group!r} on stream {stream!r} exists with a different configuration"
            )
        consumer: SharedConsumer | OrderedConsumer
        if spec.kind == "ordered":
            consumer = OrderedConsumer(self, entry, group, member)
        else:
            consumer = SharedConsumer(self, entry, group, member)
        self.consumers.add(consumer)
        try:
            await consumer.start()
        except BaseException:
            self.consumers.discard(consumer)
            raise
        return consumer

    async def delete_group(self, stream: str, group: str) -> None:
        self._check_open()
        entry = await self._stream(stream)
        validate_name(group, "group")
        await self.registry.sync()
        found = entry.groups.get(group)
        if found is None:
            raise GroupNotFoundError(f"no group {group!r} on stream {stream!r}")
        await self.registry.append({"op": "ungroup", "stream": stream, "group": group})
        await self.groups.drop(entry, found)

    # -- lag and dead letters ----------------------------------------------------------------------------

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        self._check_open()
        entry = await self._stream(stream)
        found = entry.groups.get(group)
        if found is None:
            await self.registry.sync()
            found = entry.groups.get(group)
        if found is None:
            raise GroupNotFoundError(f"no group {group!r} on stream {stream!r}")
        if found.spec.kind == "shared":
            return [await self.groups.shared_lag(entry, found)]
        return list(
            await asyncio.gather(
                *(self.groups.ordered_lag(entry, found, p) for p in range(entry.spec.partitions))
            )
        )

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        self._check_open()
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        entry = await self._stream(stream)
        validate_name(group, "group")
        name = self.groups.dead_letter_spec(entry.spec, group).name
        letters_entry = self.registry.streams.get(name)
        if letters_entry is None:
            await self.registry.sync()
            letters_entry = self.registry.streams.get(name)
            if letters_entry is None:
                return []
        last = await self.probe(name, 0, "last")
        letters: list[Message] = []

        async def collect(delivered: DeliveredMessage, offset: int) -> bool:
            letters.append(decode(delivered, stream=name, partition=0, offset=offset))
            return len(letters) < max_messages

        await self.read_partition(name, 0, letters_entry.floor(0), last, collect)
        return letters


def _check_limits(spec: StreamSpec) -> None:
    if spec.max_msgs is not None:
        raise UnsupportedFeatureError(
            "rabbitmq",
            "max_msgs retention",
            "RabbitMQ stream queues are trimmed by size and age only: use max_bytes or max_age_s",
        )
    if spec.max_age_s is not None and (
        isinstance(spec.max_age_s, bool) or not isinstance(spec.max_age_s, int | float) or spec.max_age_s <= 0
    ):
        raise InvalidConfigError(f"stream {spec.name!r}: max_age_s must be a positive number")
    if spec.max_bytes is not None and (
        isinstance(spec.max_bytes, bool) or not isinstance(spec.max_bytes, int) or spec.max_bytes < 1
    ):
        raise InvalidConfigError(f"stream {spec.name!r}: max_bytes must be a positive integer")
