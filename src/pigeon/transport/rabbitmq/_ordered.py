"""Ordered groups: members split the partitions and read each stream queue in offset order.

Who reads a partition: every partition has a quorum queue with single-active-consumer (the
token queue) holding one token message. A member registers a consumer there for each
partition it is assigned; RabbitMQ makes one of them active and delivers the token to it,
and the member holds the token unacknowledged for as long as it owns the partition. Giving
a partition up is: cancel the consumer (the next one becomes active), publish a fresh token
carrying the progress, ack the old one. A member that dies returns its token with its
connection.

Who is assigned what: members announce themselves on a fanout exchange (hello, a heartbeat
every ``heartbeat_interval_s``, bye) and every member derives the same assignment from the
members it hears, ordered by join time: member i of n takes the partitions p with
p % n == i; members beyond the partition count idle. Views can differ for a moment; the
single active consumer keeps ownership exclusive meanwhile.

Progress: the owner reads the partition's stream queue from the committed offset, hands
out one batch at a time, and writes a commit record (next offset, how far it has delivered,
counts and failures of redelivered offsets) to a one-message queue (``x-max-length`` 1)
before handing out a batch and after the batch is settled. The record survives the owner;
the next owner starts from the newest of the record and the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...engine.groups.base import check_fetch, check_nack_delay
from ...engine.groups.deadletter import Failures
from ...errors import AlreadySettledError, DeliveryNotOwnedError, GroupNotFoundError, TransportClosedError
from ...message import Message
from ..base import Consumer, Received
from ._archive import offset_of
from ._channel import Chan, cancel_quietly, unexpected
from ._codec import PERSISTENT, decode
from ._registry import GroupEntry, StreamEntry

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

log = logging.getLogger("pigeon.transport.rabbitmq")


class OrderedDelivery:
    __slots__ = ("_epoch", "_member", "delivery_count", "message", "settled")

    def __init__(self, member: OrderedConsumer, message: Message, count: int, epoch: int) -> None:
        self._member = member
        self.message = message
        self.delivery_count = count
        self._epoch = epoch
        self.settled = False

    @property
    def partition(self) -> int:
        return self.message.partition or 0

    @property
    def offset(self) -> int:
        return self.message.offset or 0

    async def ack(self) -> None:
        await self._member._ack(self)

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._member._nack(self, delay, error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._member._term(self, reason)

    async def in_progress(self) -> None:
        self._member._check_settle(self)

    def __repr__(self) -> str:
        return f"<OrderedDelivery {self.message!r} delivery={self.delivery_count}>"


class _Partition:
    def __init__(self, p: int) -> None:
        self.p = p
        self.lock = asyncio.Lock()  # take-over and release never interleave
        self.token_tag = ""
        self.token: DeliveredMessage | None = None
        self.owned = False  # the token is held and the progress restored
        self.releasing = False
        self.reader_tag = ""
        self.generation = 0  # bumped when the reader stops: its late deliveries are dropped
        self.buffer: deque[DeliveredMessage] = deque()
        self.committed = 0  # the last value written
        self.processed = 0  # every offset below is settled
        self.position = 0  # next offset to hand out
        self.delivered_upto = 0
        self.redelivered: dict[int, int] = {}
        self.failures: dict[int, Failures] = {}
        self.batch: list[OrderedDelivery] = []
        self.settled_prefix = 0
        self.epoch = 0  # bumped when the outstanding batch is cancelled
        self.paused_until = 0.0

    def state(self, *, released: bool = False) -> dict[str, Any]:
        return {
            "next": self.processed,
            "delivered_upto": self.delivered_upto,
            "redelivered": {str(o): c for o, c in self.redelivered.items() if o >= self.processed},
            "failures": {
                str(o): [f.first_at, f.last_at, f.error_type, f.error_message]
                for o, f in self.failures.items()
                if o >= self.processed
            },
            "released": released,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.committed = self.processed = self.position = int(state["next"])
        self.delivered_upto = max(self.processed, int(state.get("delivered_upto", self.processed)))
        self.redelivered = {int(o): int(c) for o, c in state.get("redelivered", {}).items()}
        self.failures = {}
        for o, (first, last, error_type, error_message) in state.get("failures", {}).items():
            self.failures[int(o)] = Failures(first, last, error_type, error_message)

    def note_delivered(self, start: int, end: int) -> None:
        for offset in range(start, min(end, self.delivered_upto)):
            self.redelivered[offset] = self.redelivered.get(offset, 1) + 1
        self.delivered_upto = max(self.delivered_upto, end)

    def count_for(self, offset: int) -> int:
        return self.redelivered.get(offset, 1) + 1 if offset < self.delivered_upto else 1

    @property
    def in_flight(self) -> int:
        return sum(not d.settled for d in self.batch)


class OrderedConsumer(Consumer):
    def __init__(
        self, transport: RabbitMQTransport, stream: StreamEntry, group: GroupEntry, member: str | None
    ) -> None:
        self._t = transport
        self.stream = stream.name
        self.partitions = stream.spec.partitions
        self.spec = group.spec
        self.name = member or uuid.uuid4().hex[:12]
        # Unique even when the caller reuses a name: two members must never merge.
        self._id = f"{self.name}.{uuid.uuid4().hex[:8]}"
        self._joined = time.time()
        self._members: dict[str, tuple[float, float]] = {}  # id -> (joined, last heard)
        self._parts: dict[int, _Partition] = {}
        self._control: Chan | None = None  # tokens, membership, commit reads
        self._data: Chan | None = None  # stream queue readers
        self._wake = asyncio.Event()
        self._rebalancing = asyncio.Lock()
        self._heartbeat: asyncio.Task[None] | None = None
        self._tags = 0
        self._rotation = 0
        self._gone = False
        self._closed = False
        names = transport.names
        self._members_exchange = names.members_exchange(stream.name, group.spec.group)

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def owned(self) -> list[int]:
        return sorted(p for p, part in self._parts.items() if part.owned)

    def in_flight(self, p: int) -> int:
        part = self._parts.get(p)
        return 0 if part is None else part.in_flight

    # -- membership --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._control = await self._t.open_chan()
        self._data = await self._t.open_chan()
        raw = self._control.raw
        raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        try:
            await raw.basic_qos(prefetch_count=1)  # a token at a time per consumer
            await self._data.raw.basic_qos(prefetch_count=self._t.options.read_ahead)
            await raw.exchange_declare(self._members_exchange, exchange_type="fanout", auto_delete=True)
            ok = await raw.queue_declare("", exclusive=True, auto_delete=True)
            await raw.queue_bind(ok.queue or "", self._members_exchange)
            await raw.basic_consume(ok.queue or "", self._on_member, no_ack=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            await self._close_channels()
            raise unexpected(error, f"joining group {self.group!r}") from None
        self._members[self._id] = (self._joined, time.monotonic())
        await self._announce("hello")
        await asyncio.sleep(self._t.options.join_wait_s)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        await self._rebalance()

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        # RabbitMQ cancels the consumers of a deleted queue: the group's token queues.
        if any(part.token_tag == frame.consumer_tag for part in self._parts.values()):
            self._gone = True
            self._wake.set()

    async def _announce(self, op: str) -> None:
        chan = self._control
        if chan is None or chan.closed:
            return
        body = json.dumps({"op": op, "id": self._id, "joined": self._joined}).encode()
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await chan.raw.basic_publish(body, exchange=self._members_exchange)

    async def _on_member(self, delivered: DeliveredMessage) -> None:
        try:
            note = json.loads(delivered.body)
            member, op, joined = str(note["id"]), note["op"], float(note["joined"])
        except (ValueError, KeyError, TypeError):
            return
        if member == self._id or self._closed:
            return
        known = member in self._members
        if op == "bye":
            self._members.pop(member, None)
        else:
            self._members[member] = (joined, time.monotonic())
        if op == "hello":
            self._t.spawn(self._announce("beat"))
        if known != (member in self._members):
            self._t.spawn(self._rebalance())

    async def _beat(self) -> None:
        options = self._t.options
        while not self._closed:
            await asyncio.sleep(options.heartbeat_interval_s)
            await self._announce("beat")
            now = time.monotonic()
            self._members[self._id] = (self._joined, now)
            for member, (_, heard) in list(self._members.items()):
                if now - heard > options.session_timeout_s:
                    log.info("group %s on %s: member %s went silent", self.group, self.stream, member)
                    del self._members[member]
            # Also retries whatever a previous rebalance could not finish.
            await self._rebalance()

    def _assignment(self) -> set[int]:
        ordered = sorted(self._members, key=lambda m: (self._members[m][0], m))
        index, count = ordered.index(self._id), len(ordered)
        return {p for p in range(self.partitions) if p % count == index}

    async def _rebalance(self) -> None:
        if self._closed:
            return
        async with self._rebalancing:
            wanted = self._assignment()
            for p in sorted(wanted - set(self._parts)):
                await self._register(p)
            for p, part in list(self._parts.items()):
                if p not in wanted and not part.releasing:
                    part.releasing = True
                    self._t.spawn(self._release(part, revoke=False))

    async def _register(self, p: int) -> None:
        chan = self._control
        if chan is None or chan.closed:
            return
        part = _Partition(p)
        self._tags += 1
        tag = f"pigeon.{self._id}.{p}.{self._tags}"
        part.token_tag = tag
        self._parts[p] = part
        queue = self._t.names.token_queue(self.stream, self.group, p)
        try:

            async def on_token(delivered: DeliveredMessage) -> None:
                self._on_token(part, tag, delivered)

            await chan.raw.basic_consume(queue, on_token, consumer_tag=tag)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            self._parts.pop(p, None)
            log.warning("group %s on %s: cannot wait for partition %d: %r", self.group, self.stream, p, error)

    def _on_token(self, part: _Partition, tag: str, delivered: DeliveredMessage) -> None:
        if self._parts.get(part.p) is not part or part.token_tag != tag or part.token is not None:
            self._t.spawn(self._give_back(tag, delivered))
            return
        part.token = delivered
        self._t.spawn(self._take_over(part))

    async def _give_back(self, tag: str, delivered: DeliveredMessage) -> None:
        """Return a token this member cannot use, once its consumer is gone (or it comes back)."""
        chan = self._control
        if chan is None or chan.closed:
            return
        await cancel_quietly(chan, tag)
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await chan.raw.basic_nack(delivered.delivery_tag or 0, requeue=True)

    async def _take_over(self, part: _Partition) -> None:
        async with part.lock:
            if part.releasing or part.token is None or self._closed:
                return
            try:
                token = json.loads(part.token.body)
            except ValueError:
                token = {"next": 0}
            record = await self._read_commit(part.p)
            # The commit record is newer unless the last owner released cleanly after it.
            state = record if record is not None and int(record["next"]) >= int(token["next"]) else token
            part.restore(state)
            part.owned = True
            log.debug(
                "group %s on %s: %s owns partition %d from %d",
                self.group,
                self.stream,
                self.name,
                part.p,
                part.processed,
            )
        self._wake.set()

    async def _read_commit(self, p: int) -> dict[str, Any] | None:
        queue = self._t.names.commit_queue(self.stream, self.group, p)
        # A lag() reader holds the record for a moment while it looks: look again before
        # concluding there is none (then the token, written at the last release, is used).
        for attempt in range(3):
            record: dict[str, Any] | None = await self._t.groups.read_commit(queue)
            if record is not None:
                return record
            if attempt < 2:
                await asyncio.sleep(0.02)
        return None

    async def _release(self, part: _Partition, *, revoke: bool) -> None:
        """Give the partition up: after its batch is settled (or ``ack_wait_s``), or at once."""
        deadline = time.monotonic() + (0 if revoke else self.spec.ack_wait_s)
        while part.owned and part.in_flight and time.monotonic() < deadline and not self._closed:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.1, max(0.0, deadline - time.monotonic()))):
                    await self._wake.wait()
        async with part.lock:
            part.releasing = True
            part.epoch += 1
            part.batch = []
            part.settled_prefix = 0
            await self._stop_reader(part)
            chan = self._control
            with contextlib.suppress(
                TransportClosedError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError
            ):
                if chan is not None and not chan.closed:
                    await cancel_quietly(chan, part.token_tag)
                    await asyncio.sleep(0)  # a token delivered before the cancel is set by now
                    token = part.token
                    if token is not None and part.owned:
                        await self._write(
                            self._t.names.commit_queue(self.stream, self.group, part.p), part.state()
                        )
                        await self._write(
                            self._t.names.token_queue(self.stream, self.group, part.p),
                            part.state(released=True),
                        )
                        await chan.raw.basic_ack(token.delivery_tag or 0)
                    elif token is not None:
                        await chan.raw.basic_nack(token.delivery_tag or 0, requeue=True)
            part.owned = False
            part.token = None
            if self._parts.get(part.p) is part:
                del self._parts[part.p]
        self._wake.set()
        if not self._closed:
            self._t.spawn(self._rebalance())

    # -- reading -------------------------------------------------------------------------------------

    def _floor(self, p: int) -> int:
        """Where a purge left partition ``p``: everything below is gone for the group."""
        entry = self._t.registry.streams.get(self.stream)
        return 0 if entry is None else entry.floor(p)

    async def _start_reader(self, part: _Partition) -> None:
        chan = self._data
        if chan is None or chan.closed:
            raise TransportClosedError(f"member {self.name!r} of group {self.group!r} lost its channel")
        part.position = max(part.position, self._floor(part.p))
        part.generation += 1
        generation = part.generation
        self._tags += 1
        tag = f"pigeon.{self._id}.r{part.p}.{self._tags}"
        part.reader_tag = tag

        async def on_message(delivered: DeliveredMessage) -> None:
            if part.generation == generation:
                part.buffer.append(delivered)
                self._wake.set()
            else:
                self._t.spawn(self._credit(delivered))

        queue = self._t.names.partition_queue(self.stream, part.p)
        try:
            await chan.raw.basic_consume(
                queue, on_message, consumer_tag=tag, arguments={"x-stream-offset": part.position}
            )
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            part.reader_tag = ""
            raise unexpected(error, f"reading partition {part.p} of {self.stream!r}") from None

    async def _stop_reader(self, part: _Partition) -> None:
        part.generation += 1
        tag, part.reader_tag = part.reader_tag, ""
        buffered = list(part.buffer)
        part.buffer.clear()
        chan = self._data
        if chan is None or chan.closed:
            return
        if tag:
            await cancel_quietly(chan, tag)
        for delivered in buffered:
            await self._credit(delivered)

    async def _credit(self, delivered: DeliveredMessage) -> None:
        """Ack a stream queue delivery: for a stream that only grants the reader more credit."""
        chan = self._data
        if chan is not None and not chan.closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await chan.raw.basic_ack(delivered.delivery_tag or 0, wait=False)

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        check_fetch(max_messages, timeout)
        deadline = time.monotonic() + timeout
        while True:
            self._check_open()
            now = time.monotonic()
            for part in list(self._parts.values()):
                if part.reader_tag and part.position < self._floor(part.p):
                    await self._stop_reader(part)  # purged: restart at the floor, not read through
                if part.owned and not part.releasing and not part.reader_tag and part.paused_until <= now:
                    await self._start_reader(part)
            self._wake.clear()
            out, touched, used = self._collect(max_messages)
            for delivered in used:
                await self._credit(delivered)
            if out:
                # Counted before they are handed out, so a crash counts as a delivery.
                for part in touched:
                    await self._commit(part)
                return out
            paused = [p.paused_until for p in self._parts.values() if p.owned and p.paused_until > now]
            wake_at = min([deadline, *paused])
            remaining = wake_at - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
            elif time.monotonic() >= deadline:
                return []

    def _collect(self, max_messages: int) -> tuple[list[Received], list[_Partition], list[DeliveredMessage]]:
        """Take the next batch of each free partition (no await: nothing changes under it)."""
        out: list[Received] = []
        touched: list[_Partition] = []
        used: list[DeliveredMessage] = []
        now = time.monotonic()
        parts = sorted(self._parts.values(), key=lambda part: part.p)
        if not parts:
            return out, touched, used
        self._rotation = (self._rotation + 1) % len(parts)
        for part in parts[self._rotation :] + parts[: self._rotation]:
            if len(out) >= max_messages:
                break
            if not part.owned or part.releasing or part.batch or part.paused_until > now or not part.buffer:
                continue
            part.position = max(part.position, self._floor(part.p))
            batch: list[OrderedDelivery] = []
            while part.buffer and len(out) + len(batch) < max_messages:
                delivered = part.buffer.popleft()
                used.append(delivered)
                offset = offset_of(delivered)
                if offset < part.position:
                    continue  # the chunk began before where this reader started
                message = decode(delivered, stream=self.stream, partition=part.p, offset=offset)
                batch.append(OrderedDelivery(self, message, part.count_for(offset), part.epoch))
                part.position = offset + 1
            if not batch:
                continue
            first, end = batch[0].offset, batch[-1].offset + 1
            part.note_delivered(first, end)
            if first > part.processed:  # retention removed what lay between
                part.processed = first
            part.batch = batch
            part.settled_prefix = 0
            out += batch
            touched.append(part)
        return out, touched, used

    # -- settling --------------------------------------------------------------------------------------

    def _check_settle(self, delivery: OrderedDelivery) -> _Partition:
        if delivery.settled:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        part = self._parts.get(delivery.partition)
        if part is None or not part.owned or delivery._epoch != part.epoch or self._closed:
            raise DeliveryNotOwnedError(
                f"{delivery!r} is no longer held by member {self.name!r} (partition revoked or rewound)"
            )
        return part

    def _settle(self, delivery: OrderedDelivery) -> _Partition:
        part = self._check_settle(delivery)
        delivery.settled = True
        return part

    @staticmethod
    def _advance(part: _Partition) -> bool:
        """Move ``processed`` over the settled prefix of the batch; True when all is settled."""
        batch = part.batch
        i = part.settled_prefix
        while i < len(batch) and batch[i].settled:
            i += 1
        part.settled_prefix = i
        if i < len(batch):
            part.processed = batch[i].offset
            return False
        if batch:
            part.processed = batch[-1].offset + 1
            part.redelivered = {o: c for o, c in part.redelivered.items() if o >= part.processed}
            part.batch = []
            part.settled_prefix = 0
        return True

    async def _ack(self, delivery: OrderedDelivery) -> None:
        part = self._settle(delivery)
        part.failures.pop(delivery.offset, None)
        await self._acknowledged(part)

    async def _acknowledged(self, part: _Partition) -> None:
        if self._advance(part):
            await self._commit(part)
            self._wake.set()

    async def _nack(
        self, delivery: OrderedDelivery, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        part = self._settle(delivery)
        failures = part.failures.setdefault(delivery.offset, Failures())
        failures.note(error, time.time())
        max_deliver = self.spec.max_deliver
        if max_deliver is not None and delivery.delivery_count >= max_deliver:
            await self._give_up(delivery, part, failures)
            return
        if delay is None:
            delay = self.spec.backoff.delay(delivery.delivery_count) if self.spec.backoff else 0.0
        # Rewind to the first unsettled message (normally this one): it and everything after
        # it are read again from the stream queue, in order, after the delay.
        part.batch = [d for d in part.batch if d.offset < delivery.offset]
        part.settled_prefix = min(part.settled_prefix, len(part.batch))
        self._advance(part)
        part.processed = min(part.processed, delivery.offset)
        part.epoch += 1
        part.batch = []
        part.settled_prefix = 0
        part.position = part.processed
        part.paused_until = time.monotonic() + delay if delay else 0.0
        await self._stop_reader(part)
        await self._commit(part)
        self._wake.set()

    async def _term(self, delivery: OrderedDelivery, reason: BaseException | str | None) -> None:
        part = self._settle(delivery)
        failures = part.failures.setdefault(delivery.offset, Failures())
        failures.note(reason or "terminated", time.time())
        await self._give_up(delivery, part, failures)

    async def _give_up(self, delivery: OrderedDelivery, part: _Partition, failures: Failures) -> None:
        """Dead-letter the message (when enabled) and move past it as if acknowledged."""
        if self.spec.dead_letter:
            await self._t.groups.dead_letter(
                self.stream, self.group, delivery.message, delivery.delivery_count, failures
            )
        part.failures.pop(delivery.offset, None)
        await self._acknowledged(part)

    async def _commit(self, part: _Partition) -> None:
        await self._write(self._t.names.commit_queue(self.stream, self.group, part.p), part.state())
        part.committed = part.processed

    async def _write(self, queue: str, state: dict[str, Any]) -> None:
        props = Basic.Properties(delivery_mode=PERSISTENT, content_type="application/json")
        await self._t.publish_confirmed("", queue, json.dumps(state).encode(), props)

    # -- leaving ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError(f"member {self.name!r} of group {self.group!r} was closed")
        if self._gone:
            raise GroupNotFoundError(f"group {self.group!r} on stream {self.stream!r} was deleted")
        for chan in (self._control, self._data):
            if chan is None or chan.closed:
                raise TransportClosedError(f"member {self.name!r} of group {self.group!r} lost its channel")

    async def close(self) -> None:
        """Leave: commit what was acknowledged, hand the partitions on, say goodbye."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for part in list(self._parts.values()):
            with contextlib.suppress(Exception):
                await self._release(part, revoke=True)
        await self._announce("bye")
        await self._close_channels()
        self._wake.set()
        self._t.forget(self)

    async def _close_channels(self) -> None:
        for chan in (self._data, self._control):
            if chan is not None:
                await chan.close()
