"""Group members on JetStream pull consumers: what both kinds share, and shared groups.

A shared group is a durable pull consumer named like the group on each partition's stream.
JetStream does the leasing (``ack_wait``), redelivery, delayed naks and delivery counting;
pigeon adds dead letters and the lease checks that make a late settle fail loudly.
"""

from __future__ import annotations

import json
import logging
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from ...engine.groups.base import check_fetch, check_nack_delay
from ...engine.groups.deadletter import Failures
from ...errors import AlreadySettledError, DeliveryNotOwnedError, GroupNotFoundError, MemberNotFoundError
from ...message import Message
from ..base import Consumer, ConsumerSpec, Received
from ._codec import jetstream_errors, read_message
from ._options import Layout, NatsOptions, purge_subject
from ._pull import EXPIRES_MARGIN_S, MIN_EXPIRES_S, Arrival, Puller, Signal

if TYPE_CHECKING:
    from ._transport import NatsTransport

log = logging.getLogger("pigeon.transport.nats")

ACK = b"+ACK"
NAK = b"-NAK"
TERM = b"+TERM"
WPI = b"+WPI"

# Failure notes of messages in flight, per (stream, group, sequence): enough for a dead letter.
_MAX_FAILURE_NOTES = 100_000


def nak_with_delay(delay: float) -> bytes:
    return NAK if delay <= 0 else b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()


class FailureNotes:
    """What went wrong with messages still being retried, as known to this process."""

    def __init__(self) -> None:
        self._notes: OrderedDict[tuple[str, str, int], Failures] = OrderedDict()

    def note(self, key: tuple[str, str, int], error: BaseException | str | None) -> Failures:
        failures = self._notes.get(key)
        if failures is None:
            failures = self._notes[key] = Failures()
            if len(self._notes) > _MAX_FAILURE_NOTES:
                self._notes.popitem(last=False)
        failures.note(error, time.time())
        return failures

    def pop(self, key: tuple[str, str, int]) -> None:
        self._notes.pop(key, None)


@dataclass
class GroupContext:
    transport: NatsTransport
    layout: Layout
    spec: ConsumerSpec

    @property
    def nc(self) -> Client:
        return self.transport.nc

    @property
    def js(self) -> JetStreamContext:
        return self.transport.js

    @property
    def options(self) -> NatsOptions:
        return self.transport.options

    def message(self, arrival: Arrival, p: int) -> Message:
        msg = arrival.msg
        subject = msg.subject
        if self.layout.partitions > 1:
            prefix = self.layout.prefixes[p]
            if subject.startswith(prefix):
                subject = subject[len(prefix) :]
        return read_message(
            subject,
            msg.data,
            msg.headers,
            timestamp=arrival.meta.timestamp,
            stream=self.layout.name,
            partition=p,
            offset=arrival.offset,
        )

    def failure_key(self, p: int, offset: int) -> tuple[str, str, int]:
        return (self.layout.streams[p], self.spec.group, offset)

    async def give_up(self, message: Message, delivery_count: int, failures: Failures) -> None:
        if self.spec.dead_letter:
            await self.transport.send_dead_letter(self, message, delivery_count, failures)


class Member(Consumer):
    """The fetch loop both kinds share; they say what to hand out and which partitions to ask."""

    # The longest a pull request waits; ordered members keep it short so a partition they
    # must hand over is free of requests soon.
    max_expires_s = 30.0

    def __init__(self, ctx: GroupContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.puller = Puller(
            ctx.nc,
            ctx.layout.streams,
            ctx.spec.group,
            self._arrived,
            ctx.options.subscription_buffer,
            purge_subject(ctx.layout.name),
        )
        self.signal = Signal()
        self.left = ""  # why this member is no longer in the group
        self._rotation = 0

    def _check_member(self) -> None:
        if self.puller.deleted:
            raise GroupNotFoundError(
                f"group {self.ctx.spec.group!r} on stream {self.ctx.layout.name!r} was deleted"
            )
        if self.left:
            raise MemberNotFoundError(
                f"member {self.name!r} is no longer in group {self.ctx.spec.group!r}: {self.left}"
            )

    def _partitions_in_turn(self, partitions: Sequence[int]) -> list[int]:
        if not partitions:
            return []
        self._rotation = (self._rotation + 1) % len(partitions)
        return [*partitions[self._rotation :], *partitions[: self._rotation]]

    async def _arrived(self, p: int) -> None:
        self.signal.set()

    @abstractmethod
    async def _collect(self, max_messages: int) -> list[Received]:
        """Hand out up to ``max_messages`` of what has arrived."""

    @abstractmethod
    def _pullable(self, now: float) -> list[int]:
        """The partitions that may be asked for messages now."""

    def _wake_at(self, now: float) -> float:
        """Besides arrivals, when the fetch loop should look again (a pause ending)."""
        return float("inf")

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        check_fetch(max_messages, timeout)
        self._check_member()
        with jetstream_errors(f"group {self.ctx.spec.group!r} on stream {self.ctx.layout.name!r}"):
            return await self._fetch(max_messages, timeout)

    async def _fetch(self, max_messages: int, timeout: float) -> Sequence[Received]:
        batch = min(max_messages, self.ctx.spec.max_ack_pending)
        deadline = time.monotonic() + timeout
        if timeout < MIN_EXPIRES_S:
            # Only what is there now: one no_wait request per partition, answered at once.
            armed = self.signal.armed
            out = await self._collect(max_messages)
            if out:
                return out
            pullable = self._pullable(time.monotonic())
            for p in pullable:
                await self.puller.pull(p, -(-batch // len(pullable)), None)
            until = time.monotonic() + min(self.ctx.options.request_timeout_s, 0.5)
            while not any(self.puller.buffers) and any(
                self.puller.outstanding(p) for p in range(len(self.puller.buffers))
            ):
                if not await self.signal.wait(armed, until - time.monotonic()):
                    break
                armed = self.signal.armed
            return await self._collect(max_messages)
        while True:
            armed = self.signal.armed  # before looking: an arrival during an await wakes us
            out = await self._collect(max_messages)
            if out:
                return out
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return []
            expires = min(remaining, self.max_expires_s) + EXPIRES_MARGIN_S
            pullable = self._pullable(now)
            # The batch is split over the partitions asked, so that one fetch leases about
            # what it asked for, not that many per partition.
            for p in pullable:
                await self.puller.pull(p, -(-batch // len(pullable)), expires)
            wake_at = min(deadline, self._wake_at(now), self.puller.next_expiry())
            await self.signal.wait(armed, wake_at - time.monotonic())
            self._check_member()


class SharedDelivery:
    """A message leased to one member of a shared group until ``ack_wait`` passes."""

    __slots__ = (
        "_member",
        "_partition",
        "_reply",
        "cancelled",
        "deadline",
        "delivery_count",
        "message",
        "settled",
    )

    def __init__(
        self,
        member: SharedMember,
        message: Message,
        delivery_count: int,
        partition: int,
        reply: str,
        deadline: float,
    ) -> None:
        self.message = message
        self.delivery_count = delivery_count
        self._member = member
        self._partition = partition
        self._reply = reply
        self.deadline = deadline
        self.settled = False
        self.cancelled = False

    @property
    def partition(self) -> int:
        return self._partition

    @property
    def offset(self) -> int:
        return self.message.offset  # type: ignore[return-value]

    async def ack(self) -> None:
        await self._member._ack(self)

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._member._nack(self, delay, error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._member._term(self, reason)

    async def in_progress(self) -> None:
        await self._member._in_progress(self)

    def __repr__(self) -> str:
        m = self.message
        where = f"{m.stream}[{m.partition}]@{m.offset}"
        return f"<SharedDelivery {m.subject!r} {where} delivery={self.delivery_count}>"


class SharedMember(Member):
    """A member of a shared group: any partition, any message, each leased for ``ack_wait_s``.

    Requests of a fetch that returned early stay open and fill a local buffer (prefetch);
    what waits there longer than ``ack_wait_s`` is dropped (JetStream redelivers it).
    """

    def __init__(self, ctx: GroupContext, name: str) -> None:
        super().__init__(ctx, name)
        self._held: dict[int, SharedDelivery] = {}
        spec = ctx.spec
        self._ack_wait = spec.ack_wait_s
        self._max_deliver = spec.max_deliver

    @classmethod
    async def join(cls, ctx: GroupContext, name: str) -> SharedMember:
        member = cls(ctx, name)
        await member.puller.start()
        return member

    def _pullable(self, now: float) -> list[int]:
        return [p for p in range(len(self.puller.buffers)) if not self.puller.outstanding(p)]

    async def _collect(self, max_messages: int) -> list[Received]:
        out: list[Received] = []
        spent: list[tuple[int, Arrival]] = []
        now = time.monotonic()
        ack_wait = self._ack_wait
        max_deliver = self._max_deliver
        for p in self._partitions_in_turn(range(len(self.puller.buffers))):
            buffer = self.puller.buffers[p]
            while buffer and len(out) < max_messages:
                arrival = buffer.popleft()
                if now - arrival.received >= ack_wait:
                    continue  # its lease ran out in the buffer: JetStream delivers it again
                if max_deliver is not None and arrival.meta.delivered > max_deliver:
                    spent.append((p, arrival))
                    continue
                delivery = SharedDelivery(
                    self,
                    self.ctx.message(arrival, p),
                    arrival.meta.delivered,
                    p,
                    arrival.msg.reply,
                    arrival.received + ack_wait,
                )
                self._held[id(delivery)] = delivery
                out.append(delivery)
        for p, arrival in spent:
            await self._spent(p, arrival)
        return out

    async def _spent(self, p: int, arrival: Arrival) -> None:
        """The last allowed delivery's lease expired (JetStream allows one more delivery than
        ``max_deliver`` so that pigeon sees it): dead-letter it without handing it out."""
        key = self.ctx.failure_key(p, arrival.offset)
        failures = self.ctx.transport.failures.note(
            key, f"not acknowledged within ack_wait ({self._ack_wait}s)"
        )
        await self.ctx.give_up(self.ctx.message(arrival, p), arrival.meta.delivered - 1, failures)
        self.ctx.transport.failures.pop(key)
        await self.puller.settle(arrival.msg.reply, TERM)

    def _take(self, delivery: SharedDelivery) -> None:
        if delivery.settled:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        if delivery.cancelled or self.left:
            raise DeliveryNotOwnedError(f"{delivery!r} belonged to member {self.name!r}, which left")
        if time.monotonic() > delivery.deadline:
            raise DeliveryNotOwnedError(
                f"{delivery!r}: its lease ran out (ack_wait {self._ack_wait}s); it is delivered again"
            )
        delivery.settled = True
        self._held.pop(id(delivery), None)

    async def _ack(self, delivery: SharedDelivery) -> None:
        self._take(delivery)
        self.ctx.transport.failures.pop(self.ctx.failure_key(delivery.partition, delivery.offset))
        await self.puller.settle(delivery._reply, ACK)

    async def _nack(
        self, delivery: SharedDelivery, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        self._take(delivery)
        failures = self.ctx.transport.failures.note(
            self.ctx.failure_key(delivery.partition, delivery.offset), error
        )
        count = delivery.delivery_count
        if self._max_deliver is not None and count >= self._max_deliver:
            await self._give_up(delivery, failures)
            return
        if delay is None:
            backoff = self.ctx.spec.backoff
            delay = backoff.delay(count) if backoff else 0.0
        await self.puller.settle(delivery._reply, nak_with_delay(delay))

    async def _term(self, delivery: SharedDelivery, reason: BaseException | str | None) -> None:
        self._take(delivery)
        failures = self.ctx.transport.failures.note(
            self.ctx.failure_key(delivery.partition, delivery.offset), reason or "terminated"
        )
        await self._give_up(delivery, failures)

    async def _give_up(self, delivery: SharedDelivery, failures: Failures) -> None:
        await self.ctx.give_up(delivery.message, delivery.delivery_count, failures)
        self.ctx.transport.failures.pop(self.ctx.failure_key(delivery.partition, delivery.offset))
        await self.puller.settle(delivery._reply, TERM)

    async def _in_progress(self, delivery: SharedDelivery) -> None:
        if delivery.settled:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        if delivery.cancelled or self.left or time.monotonic() > delivery.deadline:
            raise DeliveryNotOwnedError(f"{delivery!r} is no longer held by member {self.name!r}")
        await self.puller.settle(delivery._reply, WPI)
        delivery.deadline = time.monotonic() + self._ack_wait

    async def close(self) -> None:
        """Leave: what this member holds or has buffered is handed back for redelivery at once."""
        if self.left:
            return
        self.left = "it left"
        await self.puller.stop()
        if self.ctx.nc.is_closed:
            return
        try:
            for buffer in self.puller.buffers:
                while buffer:
                    await self.puller.settle(buffer.popleft().msg.reply, NAK)
            for delivery in list(self._held.values()):
                delivery.cancelled = True
                if time.monotonic() <= delivery.deadline:
                    await self.puller.settle(delivery._reply, NAK)
        except Exception as error:  # the messages come back after ack_wait anyway
            log.debug("handing back the messages of %s failed: %r", self.name, error)
        self._held.clear()
        self.ctx.transport.forget_member(self)


def spec_json(spec: ConsumerSpec) -> dict[str, Any]:
    """What makes two joins the same group (stored in the consumers' description)."""
    backoff = spec.backoff
    return {
        "kind": spec.kind,
        "start": [spec.start.kind, spec.start.value],
        "ack_wait_s": spec.ack_wait_s,
        "max_deliver": spec.max_deliver,
        "backoff": None
        if backoff is None
        else {k: getattr(backoff, k) for k in backoff.__dataclass_fields__},
        "max_ack_pending": spec.max_ack_pending,
        "dead_letter": spec.dead_letter,
    }
