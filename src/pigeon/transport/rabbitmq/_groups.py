"""Creating, deleting and measuring consumer groups; retries and dead letters (see the
package documentation for the design)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...engine.config import StartAt, StreamConfig
from ...engine.groups.deadletter import Failures, dead_letter_message, dead_letter_stream, dead_letter_subject
from ...errors import StreamNotFoundError
from ...message import Message
from ..base import ConsumerSpec, PartitionLag, StreamSpec
from ._channel import Chan, unexpected
from ._codec import (
    H_OFFSET,
    H_PARTITION,
    H_PURGES,
    H_SUBJECT,
    copy_properties,
    properties,
    routing_key,
    subject_of,
    timestamp_of,
)
from ._options import LEVELS
from ._ordered import OrderedConsumer
from ._registry import GroupEntry, StreamEntry, consumer_spec_to_json
from ._shared import SharedConsumer

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

# Copies made while backfilling a new shared group are published this many at a time.
_COPY_WINDOW = 256


class Groups:
    def __init__(self, transport: RabbitMQTransport) -> None:
        self.t = transport
        self._levels: set[str] = set()  # retry queues declared by this transport

    async def create(self, entry: StreamEntry, spec: ConsumerSpec) -> GroupEntry:
        async with self.t.lock(f"group {entry.name}/{spec.group}"):
            await self.t.registry.sync()
            current = self.t.registry.streams.get(entry.name)
            if current is not entry:
                raise StreamNotFoundError(f"stream {entry.name!r} was deleted")
            existing = entry.groups.get(spec.group)
            if existing is not None:
                return existing
            if spec.dead_letter:
                await self.ensure_dead_letter_stream(entry, spec.group)
            # Leftovers of a creation that did not finish go first.
            await self.drop_objects(entry, spec.group, spec.kind)
            if spec.kind == "ordered":
                starts = await self.create_ordered(entry, spec)
            else:
                starts = await self.create_shared(entry, spec)
            record = {
                "op": "group",
                "stream": entry.name,
                "spec": consumer_spec_to_json(spec),
                "starts": starts,
            }
            await self.t.registry.append(record)
            group = entry.groups.get(spec.group)
            if group is None:
                raise StreamNotFoundError(f"stream {entry.name!r} was deleted while its group was created")
            return group

    def dead_letter_spec(self, stream: StreamSpec, group: str) -> StreamSpec:
        config = dead_letter_stream(StreamConfig(name=stream.name, subjects=stream.subjects), group)
        return StreamSpec(config.name, config.subjects)

    async def ensure_dead_letter_stream(self, entry: StreamEntry, group: str) -> StreamEntry:
        # Created with the group, as by the embedded engine: a name or subject RabbitMQ or the
        # registry refuses fails the creation instead of stranding a message later. A stream
        # of that name created beforehand (with its own retention) is used as it is.
        spec = self.dead_letter_spec(entry.spec, group)
        if spec.name not in self.t.registry.streams:
            await self.t.create_stream(spec)
        return self.t.registry.streams[spec.name]

    async def start_offset(self, entry: StreamEntry, p: int, start: StartAt) -> int:
        # A group never starts below a purge: the stream queue still holds what it removed.
        return max(entry.floor(p), await self._start_offset(entry, p, start))

    async def _start_offset(self, entry: StreamEntry, p: int, start: StartAt) -> int:
        if start.kind == "earliest":
            return 0
        if start.kind == "offset":
            return int(start.value)
        if start.kind == "time":
            found = -1

            async def first_at_or_after(delivered: DeliveredMessage, offset: int) -> bool:
                nonlocal found
                stamp = timestamp_of(delivered.header.properties.headers)
                if stamp is not None and stamp >= start.value:
                    found = offset
                    return False
                return True

            last = await self.t.probe(entry.name, p, "last")
            await self.t.read_partition(entry.name, p, float(start.value), last, first_at_or_after)
            if found >= 0:
                return found
            return last + 1
        return await self.t.probe(entry.name, p, "last") + 1  # latest

    async def create_shared(self, entry: StreamEntry, spec: ConsumerSpec) -> list[int]:
        names = self.t.names
        queue = names.group_queue(entry.name, spec.group)
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if spec.dead_letter:
            dead_letters = self.dead_letter_spec(entry.spec, spec.group)
            arguments["x-dead-letter-exchange"] = names.stream_exchange(dead_letters.name)
            arguments["x-dead-letter-routing-key"] = routing_key("0", dead_letters.subjects[0])
        if spec.max_deliver is not None:
            # pigeon gives up first (its count includes nacks); this only catches what it missed.
            arguments["x-delivery-limit"] = spec.max_deliver + 1
        stream_exchange = names.stream_exchange(entry.name)
        await self.t.admin_call(
            f"creating group {spec.group!r}",
            [
                lambda ch: ch.queue_declare(queue, durable=True, arguments=arguments),
                lambda ch: ch.queue_bind(queue, stream_exchange, routing_key="#"),
            ],
        )
        partitions = range(entry.spec.partitions)
        starts = list(await asyncio.gather(*(self.start_offset(entry, p, spec.start) for p in partitions)))
        if spec.start.kind == "latest":
            return starts
        # History: RabbitMQ routes only new messages to the new queue, so copy what the stream
        # queues hold from the start up to their end, measured once the binding is in place
        # (and in-flight publishes routed without it have landed).
        await asyncio.sleep(self.t.options.bind_grace_s)
        ends = await asyncio.gather(*(self.t.probe(entry.name, p, "last") for p in partitions))
        await asyncio.gather(*(self.copy(entry.name, p, queue, starts[p], ends[p]) for p in partitions))
        return starts

    async def copy(self, stream: str, p: int, queue: str, start: int, stop: int) -> None:
        window: list[asyncio.Future[None]] = []

        async def copy_one(delivered: DeliveredMessage, offset: int) -> bool:
            extra = {H_SUBJECT: subject_of(delivered.routing_key or ""), H_PARTITION: p, H_OFFSET: offset}
            props = copy_properties(delivered, extra)
            window.append(asyncio.ensure_future(self.t.publish_confirmed("", queue, delivered.body, props)))
            if len(window) >= _COPY_WINDOW:
                await asyncio.gather(*window)
                window.clear()
            return True

        try:
            await self.t.read_partition(stream, p, start, stop, copy_one)
        finally:
            await asyncio.gather(*window, return_exceptions=True)

    async def create_ordered(self, entry: StreamEntry, spec: ConsumerSpec) -> list[int]:
        names = self.t.names
        partitions = range(entry.spec.partitions)
        starts = list(await asyncio.gather(*(self.start_offset(entry, p, spec.start) for p in partitions)))
        calls: list[Any] = []
        for p in partitions:
            token_queue = names.token_queue(entry.name, spec.group, p)
            commit_queue = names.commit_queue(entry.name, spec.group, p)
            calls.append(
                lambda ch, q=token_queue: ch.queue_declare(
                    q, durable=True, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True}
                )
            )
            calls.append(
                lambda ch, q=commit_queue: ch.queue_declare(q, durable=True, arguments={"x-max-length": 1})
            )
        await self.t.admin_call(f"creating group {spec.group!r}", calls)
        for p in partitions:
            token = {"next": starts[p], "delivered_upto": starts[p], "released": True}
            props = Basic.Properties(delivery_mode=2, content_type="application/json")
            await self.t.publish_confirmed(
                "", names.token_queue(entry.name, spec.group, p), json.dumps(token).encode(), props
            )
        return starts

    async def drop(self, entry: StreamEntry, group: GroupEntry) -> None:
        for consumer in list(self.t.consumers):
            if consumer.stream == entry.name and consumer.group == group.spec.group:
                with contextlib.suppress(Exception):
                    await consumer.close()
        await self.drop_objects(entry, group.spec.group, group.spec.kind)

    async def drop_objects(self, entry: StreamEntry, group: str, kind: str) -> None:
        names = self.t.names
        calls: list[Any]
        if kind == "shared":
            queues = [names.group_queue(entry.name, group)]
            queues += [names.level_queue(entry.name, group, level) for level in range(LEVELS)]
            calls = [lambda ch, q=q: ch.queue_delete(q) for q in queues]
            self._levels.difference_update(queues)
        else:
            calls = []
            for p in range(entry.spec.partitions):
                for q in (names.token_queue(entry.name, group, p), names.commit_queue(entry.name, group, p)):
                    calls.append(lambda ch, q=q: ch.queue_delete(q))
            calls.append(lambda ch: ch.exchange_delete(names.members_exchange(entry.name, group)))
        await self.t.admin_call(f"deleting group {group!r}", calls)

    async def purge_queues(self, entry: StreamEntry) -> None:
        """Empty the queues of the stream's shared groups (ready and waiting copies). What
        members hold stays with them: they drop it by its purge count if it comes back."""
        names = self.t.names
        queues: list[str] = []
        for group in entry.groups.values():
            if group.spec.kind == "shared":
                queues.append(names.group_queue(entry.name, group.spec.group))
                queues += [names.level_queue(entry.name, group.spec.group, k) for k in sorted(group.levels)]
        chan: Chan | None = None
        try:
            for queue in queues:
                if chan is None or chan.closed:  # a refusal closes the channel
                    chan = await self.t.open_chan()
                with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):  # group deleted
                    await chan.raw.queue_purge(queue)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"purging the groups of stream {entry.name!r}") from None
        finally:
            if chan is not None:
                await chan.close()

    async def retry_level(self, stream: str, group: str, level: int) -> str:
        """The queue holding retries of up to 2**level ms; expired ones go back to the group."""
        queue = self.t.names.level_queue(stream, group, level)
        if queue not in self._levels:
            arguments = {
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.t.names.group_queue(stream, group),
            }
            await self.t.admin_call(
                f"creating a retry queue of group {group!r}",
                [lambda ch: ch.queue_declare(queue, durable=True, arguments=arguments)],
            )
            entry = self.t.registry.streams.get(stream)
            known = None if entry is None else entry.groups.get(group)
            if known is not None and level not in known.levels:
                await self.t.registry.append(
                    {"op": "level", "stream": stream, "group": group, "level": level}
                )
            self._levels.add(queue)
        return queue

    async def dead_letter(
        self, stream: str, group: str, message: Message, delivery_count: int, failures: Failures
    ) -> None:
        """Publish the dead letter (with pigeon's failure headers) into the group's dead-letter stream."""
        name = f"{stream}-{group}-dlq"  # as dead_letter_stream names it
        letter = dead_letter_message(
            message, group, delivery_count, failures, dead_letter_subject(stream, group)
        )
        headers: dict[str, Any] = dict(letter.headers)
        letters = self.t.registry.streams.get(name)
        if letters is not None and letters.purges:
            headers[H_PURGES] = letters.purges
        props = properties(letter.id, headers, letter.key, time.time(), persistent=True)
        rk = routing_key("0", letter.subject)
        try:
            await self.t.publish_confirmed(self.t.names.stream_exchange(name), rk, letter.payload, props)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise StreamNotFoundError(
                f"the dead-letter stream {name!r} of group {group!r} was deleted"
            ) from None

    async def queue_depth(self, queue: str) -> int | None:
        """Messages ready in ``queue``, None when it does not exist (a passive declare)."""
        chan = await self.t.open_chan()
        try:
            ok = await chan.raw.queue_declare(queue, passive=True)
            return ok.message_count or 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"measuring {queue!r}") from None
        finally:
            await chan.close()

    async def shared_lag(self, entry: StreamEntry, group: GroupEntry) -> PartitionLag:
        names = self.t.names
        ready = await self.queue_depth(names.group_queue(entry.name, group.spec.group)) or 0
        waiting = 0
        for level in sorted(group.levels):
            waiting += await self.queue_depth(names.level_queue(entry.name, group.spec.group, level)) or 0
        in_flight = sum(
            c.in_flight
            for c in self.t.consumers
            if isinstance(c, SharedConsumer) and c.stream == entry.name and c.group == group.spec.group
        )
        # One queue holds every partition: partition -1, head and committed unknown (-1).
        return PartitionLag(
            partition=-1,
            head=-1,
            committed=-1,
            lag=ready + in_flight + waiting,
            pending=ready,
            in_flight=in_flight,
            waiting=waiting,
        )

    async def read_commit(self, queue: str) -> dict[str, Any] | None:
        """The commit record in an ordered group's one-message queue (looked at, put back)."""
        chan = await self.t.open_chan()
        try:
            got = await chan.raw.basic_get(queue, no_ack=False)
            if not got.body or got.delivery_tag is None:
                return None
            await chan.raw.basic_reject(got.delivery_tag, requeue=True)
            record: dict[str, Any] = json.loads(got.body)
            return record
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"reading {queue!r}") from None
        finally:
            await chan.close()

    async def ordered_lag(self, entry: StreamEntry, group: GroupEntry, p: int) -> PartitionLag:
        head = await self.t.probe(entry.name, p, "last") + 1
        owner: OrderedConsumer | None = None
        for consumer in self.t.consumers:
            if (
                isinstance(consumer, OrderedConsumer)
                and consumer.stream == entry.name
                and consumer.group == group.spec.group
                and p in consumer.owned
            ):
                owner = consumer
        record = await self.read_commit(self.t.names.commit_queue(entry.name, group.spec.group, p))
        committed = int(record["next"]) if record is not None else group.starts[p]
        committed = max(committed, entry.floor(p))
        committed = min(committed, head) if head else committed
        in_flight = 0 if owner is None else owner.in_flight(p)
        lag = max(0, head - committed)
        return PartitionLag(
            partition=p,
            head=head,
            committed=committed,
            lag=lag,
            pending=max(0, lag - in_flight),
            in_flight=in_flight,
            waiting=0,
            owner=None if owner is None else owner.name,
        )
