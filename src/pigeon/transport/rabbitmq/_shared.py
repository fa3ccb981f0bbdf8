"""Shared groups: one quorum queue per group, competing consumers, leases kept by pigeon."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...engine.groups.base import check_fetch, check_nack_delay
from ...engine.groups.deadletter import Failures
from ...errors import AlreadySettledError, DeliveryNotOwnedError, GroupNotFoundError, TransportClosedError
from ...message import Message
from ..base import Consumer, Received
from ._channel import Chan, cancel_quietly, unexpected
from ._codec import (
    H_DELIVERIES,
    H_OFFSET,
    H_PARTITION,
    H_PURGES,
    H_SUBJECT,
    copy_properties,
    decode,
    failure_headers,
    failures_of,
    int_header,
    partition_of,
)
from ._options import LEVELS
from ._registry import GroupEntry, StreamEntry

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

_HELD, _SETTLED, _LOST = 0, 1, 2


class SharedDelivery:
    """One leased message. The lease is pigeon's: RabbitMQ knows only that the member's
    channel has not acknowledged it yet."""

    __slots__ = ("_delivered", "_member", "_state", "_timer", "delivery_count", "message")

    def __init__(
        self, member: SharedConsumer, delivered: DeliveredMessage, message: Message, count: int
    ) -> None:
        self._member = member
        self._delivered = delivered
        self.message = message
        self.delivery_count = count
        self._state = _HELD
        self._timer: asyncio.TimerHandle | None = None

    @property
    def partition(self) -> int:
        return self.message.partition or 0

    @property
    def offset(self) -> int:
        return -1 if self.message.offset is None else self.message.offset

    async def ack(self) -> None:
        await self._member._ack(self)

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._member._nack(self, delay, error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._member._term(self, reason)

    async def in_progress(self) -> None:
        self._member._in_progress(self)

    def __repr__(self) -> str:
        return f"<SharedDelivery {self.message!r} delivery={self.delivery_count}>"


class SharedConsumer(Consumer):
    """A member: it consumes the group's queue with a prefetch equal to the largest fetch it
    was asked for (at most ``max_ack_pending``), so RabbitMQ pushes it no more than it can
    hand out, and the members share the queue."""

    def __init__(
        self, transport: RabbitMQTransport, stream: StreamEntry, group: GroupEntry, member: str | None
    ) -> None:
        self._t = transport
        self.stream = stream.name
        self.spec = group.spec
        self.name = member or uuid.uuid4().hex[:12]
        self.queue = transport.names.group_queue(stream.name, group.spec.group)
        self._chan: Chan | None = None
        self._held: dict[int, SharedDelivery] = {}
        # Delivered by RabbitMQ, not yet handed out by a fetch.
        self._buffer: deque[DeliveredMessage] = deque()
        self._arrived = asyncio.Event()
        self._prefetch = 0  # the sum of this member's consumers' prefetch counts
        self._tags: list[str] = []
        self._fetching = asyncio.Lock()
        self._gone = False
        self._closed = False

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def in_flight(self) -> int:
        return len(self._held) + len(self._buffer)

    async def start(self) -> None:
        self._chan = await self._t.open_chan()
        self._chan.raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        # RabbitMQ cancels the consumers of a deleted queue.
        if frame.consumer_tag in self._tags:
            self._gone = True
            self._arrived.set()

    def _check_open(self) -> Chan:
        if self._closed:
            raise TransportClosedError(f"member {self.name!r} of group {self.group!r} was closed")
        if self._chan is None or self._chan.closed:
            raise TransportClosedError(f"member {self.name!r} of group {self.group!r} lost its channel")
        if self._gone and not self._buffer:
            raise GroupNotFoundError(f"group {self.group!r} on stream {self.stream!r} was deleted")
        return self._chan

    # -- fetching ---------------------------------------------------------------------------------

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        check_fetch(max_messages, timeout)
        deadline = time.monotonic() + timeout
        async with self._fetching:
            await self._grow(min(max_messages, self.spec.max_ack_pending))
            while True:
                self._check_open()
                out: list[Received] = []
                while self._buffer and len(out) < max_messages:
                    leased = await self._lease(self._buffer.popleft())
                    if leased is not None:
                        out.append(leased)
                if out:
                    return out
                self._arrived.clear()
                if not await _wait(self._arrived, deadline):
                    return []

    async def _grow(self, wanted: int) -> None:
        """Let RabbitMQ push up to ``wanted`` unsettled messages to this member.

        Prefetch is per consumer and fixed when it starts, so growing adds a consumer for
        the difference. Cancelling one instead would race: a message RabbitMQ assigns to a
        consumer while it is being cancelled is returned, counting a delivery nobody saw.
        """
        if wanted <= self._prefetch:
            return
        chan = self._check_open()

        async def on_message(delivered: DeliveredMessage) -> None:
            self._buffer.append(delivered)
            self._arrived.set()

        try:
            await chan.raw.basic_qos(prefetch_count=wanted - self._prefetch)
            ok = await chan.raw.basic_consume(self.queue, on_message)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise GroupNotFoundError(f"group {self.group!r} on {self.stream!r} was deleted") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"fetching from group {self.group!r}") from None
        self._tags.append(ok.consumer_tag or "")
        self._prefetch = wanted

    async def _requeue(self, deliveries: list[DeliveredMessage]) -> None:
        chan = self._chan
        if chan is None or chan.closed:
            return
        for delivered in deliveries:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await chan.raw.basic_nack(delivered.delivery_tag or 0, requeue=True)

    async def _lease(self, delivered: DeliveredMessage) -> SharedDelivery | None:
        entry = self._t.registry.streams.get(self.stream)
        if entry is not None and int_header(delivered, H_PURGES, 0) < entry.purges:
            # Published before the stream's latest purge: a copy the purge could not reach
            # (held by a member then, or on its way back from a nack or an expired lease).
            await self._settle_on_broker(delivered, ack=True)
            return None
        # A nack's copy carries the deliveries before it; RabbitMQ counts the returns since
        # (lease expiries, members that closed or died) in x-delivery-count.
        count = int_header(delivered, H_DELIVERIES, 0) + int_header(delivered, "x-delivery-count", 0) + 1
        message = decode(
            delivered,
            stream=self.stream,
            partition=partition_of(delivered),
            offset=int_header(delivered, H_OFFSET, -1),
        )
        max_deliver = self.spec.max_deliver
        if max_deliver is not None and count > max_deliver:
            # Its last allowed delivery expired or its member died: give up now.
            if self.spec.dead_letter:
                await self._t.groups.dead_letter(
                    self.stream, self.group, message, count - 1, failures_of(delivered)
                )
            await self._settle_on_broker(delivered, ack=True)
            return None
        leased = SharedDelivery(self, delivered, message, count)
        self._held[delivered.delivery_tag or 0] = leased
        leased._timer = asyncio.get_running_loop().call_later(self.spec.ack_wait_s, self._expire, leased)
        return leased

    # -- settling ----------------------------------------------------------------------------------

    def _take(self, delivery: SharedDelivery) -> None:
        if delivery._state == _SETTLED:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        if delivery._state == _LOST or self._closed:
            raise DeliveryNotOwnedError(
                f"{delivery!r} is no longer held by member {self.name!r} "
                "(its lease expired or the member closed)"
            )
        delivery._state = _SETTLED
        self._release(delivery)

    def _release(self, delivery: SharedDelivery) -> None:
        if delivery._timer is not None:
            delivery._timer.cancel()
            delivery._timer = None
        self._held.pop(delivery._delivered.delivery_tag or 0, None)

    async def _settle_on_broker(self, delivered: DeliveredMessage, *, ack: bool) -> None:
        chan = self._check_open()
        try:
            if ack:
                # AMQP acks have no answer; not waiting for the socket write saves a turn.
                await chan.raw.basic_ack(delivered.delivery_tag or 0, wait=False)
            else:
                await chan.raw.basic_nack(delivered.delivery_tag or 0, requeue=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, f"settling a message of group {self.group!r}") from None

    async def _ack(self, delivery: SharedDelivery) -> None:
        self._take(delivery)
        await self._settle_on_broker(delivery._delivered, ack=True)

    async def _nack(
        self, delivery: SharedDelivery, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        self._take(delivery)
        failures = failures_of(delivery._delivered)
        failures.note(error, time.time())
        count = delivery.delivery_count
        if self.spec.max_deliver is not None and count >= self.spec.max_deliver:
            await self._give_up(delivery, failures)
            return
        if delay is None:
            delay = self.spec.backoff.delay(count) if self.spec.backoff else 0.0
        await self._retry(delivery, failures, delay)
        await self._settle_on_broker(delivery._delivered, ack=True)

    async def _retry(self, delivery: SharedDelivery, failures: Failures, delay: float) -> None:
        """Publish the copy that will be delivered again: straight back into the group's
        queue, or through the retry level that holds it for ``delay`` (then dead-letters it
        into the group's queue). The copy carries the delivery count and the failures."""
        message = delivery.message
        extra = {
            H_DELIVERIES: delivery.delivery_count,
            H_SUBJECT: message.subject,
            H_PARTITION: delivery.partition,
            **failure_headers(failures),
        }
        if delivery.offset >= 0:
            extra[H_OFFSET] = delivery.offset
        milliseconds = math.ceil(delay * 1000)
        if milliseconds >= 1:
            level = min(LEVELS - 1, max(0, math.ceil(math.log2(milliseconds))))
            queue = await self._t.groups.retry_level(self.stream, self.group, level)
            props = copy_properties(delivery._delivered, extra, expiration=str(milliseconds))
        else:
            queue = self.queue
            props = copy_properties(delivery._delivered, extra)
        await self._t.publish_confirmed("", queue, delivery._delivered.body, props)

    async def _term(self, delivery: SharedDelivery, reason: BaseException | str | None) -> None:
        self._take(delivery)
        failures = failures_of(delivery._delivered)
        failures.note(reason or "terminated", time.time())
        await self._give_up(delivery, failures)

    async def _give_up(self, delivery: SharedDelivery, failures: Failures) -> None:
        if self.spec.dead_letter:
            await self._t.groups.dead_letter(
                self.stream, self.group, delivery.message, delivery.delivery_count, failures
            )
        await self._settle_on_broker(delivery._delivered, ack=True)

    def _in_progress(self, delivery: SharedDelivery) -> None:
        if delivery._state == _SETTLED:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        if delivery._state == _LOST or self._closed:
            raise DeliveryNotOwnedError(f"{delivery!r} is no longer held by member {self.name!r}")
        if delivery._timer is not None:
            delivery._timer.cancel()
        delivery._timer = asyncio.get_running_loop().call_later(self.spec.ack_wait_s, self._expire, delivery)

    def _expire(self, delivery: SharedDelivery) -> None:
        """The lease ran out: give the message back to the queue (RabbitMQ counts a return)."""
        if delivery._state != _HELD:
            return
        delivery._state = _LOST
        delivery._timer = None
        self._release(delivery)
        self._t.spawn(self._requeue([delivery._delivered]))

    # -- leaving ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Leave. Messages handed out and not settled go back to the queue with the channel
        (a return: one more delivery counted); messages received but never handed out are
        put back as copies with their count unchanged, so leaving costs them nothing."""
        if self._closed:
            return
        self._closed = True
        for delivery in list(self._held.values()):
            delivery._state = _LOST
            self._release(delivery)
        chan = self._chan
        if chan is not None and not chan.closed:
            for tag in self._tags:
                await cancel_quietly(chan, tag)
            await asyncio.sleep(0)  # the callbacks of deliveries that came before the cancel
            unseen, self._buffer = list(self._buffer), deque()
            with contextlib.suppress(Exception):
                for delivered in unseen:
                    count = int_header(delivered, H_DELIVERIES, 0) + int_header(
                        delivered, "x-delivery-count", 0
                    )
                    extra = {H_DELIVERIES: count, H_SUBJECT: decode(delivered).subject}
                    extra[H_PARTITION] = partition_of(delivered)
                    await self._t.publish_confirmed(
                        "", self.queue, delivered.body, copy_properties(delivered, extra)
                    )
                    await chan.raw.basic_ack(delivered.delivery_tag or 0)
        if chan is not None:
            await chan.close()
        self._arrived.set()
        self._t.forget(self)


async def _wait(event: asyncio.Event, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    if event.is_set():
        return True
    if remaining <= 0:
        return False
    try:
        async with asyncio.timeout(remaining):
            await event.wait()
    except TimeoutError:
        return False
    return True
