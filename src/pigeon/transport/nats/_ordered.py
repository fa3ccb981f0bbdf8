"""Ordered groups, emulated: one member per partition, in order, one outstanding batch each.

Each partition has a durable pull consumer named like the group, read by one member at a
time. Who reads what is agreed in the group's KV bucket (TTL = the session timeout):

- ``m.<token>``: a live member (tokens sort in join order), refreshed every heartbeat;
- ``p.<p>``: the owner of partition ``p``, created only if absent (``kv.create``) and
  refreshed with revision-checked updates, so two members never both believe they own it;
- ``d.<p>``: when the partition is paused after a delayed nack (wall clock), so a new owner
  waits out the rest of the delay.

Every member computes the same assignment from the sorted member list (member i owns the
partitions p with p % members == i; members beyond the partition count own nothing), claims
free partitions of its share and hands back the others once their outstanding batch is
settled and their pull request has ended (or after the session timeout). Joins, departures
and hand-backs are announced on ``$PGNC.<stream>.<group>`` so the others rebalance at once
instead of at their next heartbeat.

Order: a batch is pulled only when the previous one is fully settled. Acks are sent to
JetStream only for the settled prefix of the batch (that is the commit), so a nack leaves
the failed message and everything after it unacknowledged: they are nak'ed in offset order,
which puts them at the head of JetStream's redelivery queue in that order. The consumer's
``ack_wait`` is half the session timeout and the owner keeps its messages' leases with
``+WPI`` every heartbeat, so when a member dies its batch is redelivered before its
partition lease even expires, and the next owner receives it first. Each member also checks
the offsets it receives: copies of messages it already holds are dropped, and when an
offset is missing it waits (keeping what came after) while the consumer shows messages
pending that it does not hold; otherwise the missing ones were deleted from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from ...engine.groups.base import check_nack_delay
from ...errors import AlreadySettledError, DeliveryNotOwnedError
from ...message import Message
from ..base import Received
from ._codec import jetstream_errors
from ._groups import ACK, NAK, TERM, WPI, GroupContext, Member
from ._options import coordination_subject
from ._pull import Arrival

log = logging.getLogger("pigeon.transport.nats")

# How often a member waiting for a missing offset asks the consumer whether it is pending.
_GAP_CHECK_S = 0.2


class _Batch:
    """Shared by the deliveries of one batch: set when they may no longer be settled."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class OrderedDelivery:
    __slots__ = (
        "_batch",
        "_epoch",
        "_member",
        "_partition",
        "_reply",
        "delivery_count",
        "message",
        "settled",
    )

    def __init__(
        self,
        member: OrderedMember,
        message: Message,
        delivery_count: int,
        partition: int,
        reply: str,
        epoch: int,
        batch: _Batch,
    ) -> None:
        self.message = message
        self.delivery_count = delivery_count
        self._member = member
        self._partition = partition
        self._reply = reply
        self._epoch = epoch
        self._batch = batch
        self.settled: bytes | None = None

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
        return f"<OrderedDelivery {m.subject!r} {where} delivery={self.delivery_count}>"


class _Part:
    __slots__ = (
        "batch",
        "epoch",
        "expected",
        "gap_check_at",
        "owned",
        "p",
        "paused_until",
        "prefix",
        "release_by",
        "releasing",
        "rev",
        "waiting",
    )

    def __init__(self, p: int) -> None:
        self.p = p
        self.owned = False
        self.rev = 0  # revision of our ownership record
        self.epoch = 0  # bumped on every claim: fences settles from an earlier ownership
        self.releasing = False
        self.release_by = 0.0
        self.batch: list[OrderedDelivery] = []
        self.prefix = 0  # how many of the batch, from its start, are settled and sent
        self.expected: int | None = None  # the next offset in order, once known
        self.paused_until = 0.0
        self.waiting = False  # for a missing offset
        self.gap_check_at = 0.0


class OrderedMember(Member):
    def __init__(
        self, ctx: GroupContext, name: str, kv: KeyValue, bucket: str, session_timeout: float
    ) -> None:
        super().__init__(ctx, name)
        self.kv = kv
        self.bucket = bucket
        self.session_timeout = session_timeout
        self.heartbeat_s = min(ctx.options.heartbeat_interval_s, session_timeout / 3)
        self.max_expires_s = self.heartbeat_s
        self.token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.parts = [_Part(p) for p in range(ctx.layout.partitions)]
        self.desired: set[int] = set()
        self._value = json.dumps({"member": self.token, "name": name}).encode()
        self._subject = coordination_subject(ctx.layout.name, ctx.spec.group)
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._notifications: object = None

    @classmethod
    async def join(
        cls, ctx: GroupContext, name: str, kv: KeyValue, bucket: str, session_timeout: float
    ) -> OrderedMember:
        member = cls(ctx, name, kv, bucket, session_timeout)
        try:
            with jetstream_errors(f"group {ctx.spec.group!r} on stream {ctx.layout.name!r}"):
                await member.puller.start()
                await kv.put(f"m.{member.token}", member._value)
                member._notifications = await ctx.nc.subscribe(member._subject, cb=member._on_notice)
                await member._announce()
                await member._rebalance()
        except BaseException:
            await member.close()
            raise
        member._task = asyncio.get_running_loop().create_task(member._run())
        # Like a Kafka join: return once this member holds its share, which the others hand
        # over as soon as their outstanding batches are settled (bounded).
        deadline = time.monotonic() + 2 * member.heartbeat_s
        while True:
            armed = member.signal.armed
            if all(member.parts[p].owned for p in member.desired):
                break
            if not await member.signal.wait(armed, deadline - time.monotonic()):
                break
        return member

    # -- coordination ---------------------------------------------------------------------------

    async def _on_notice(self, _msg: object) -> None:
        self._kick.set()

    async def _announce(self) -> None:
        with contextlib.suppress(Exception):
            await self.ctx.nc.publish(self._subject, b"")

    async def _run(self) -> None:
        # Stops on `left`, not only on cancellation: a cancellation that arrives as a client
        # call inside completes can be swallowed (asyncio.wait_for on Python 3.11).
        while not self.left:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._kick.wait()
            self._kick.clear()
            if self.left:
                return
            try:
                await self._rebalance()
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                if await self._group_exists():
                    log.warning(
                        "group %s member %s: a coordination key vanished", self.ctx.spec.group, self.name
                    )
                    continue
                self.left = "its group was deleted"
                self.puller.deleted = True
                self.signal.set()
                return
            except Exception as error:  # a lost connection: try again at the next heartbeat
                log.warning(
                    "group %s member %s: rebalancing failed: %r", self.ctx.spec.group, self.name, error
                )

    async def _group_exists(self) -> bool:
        try:
            await self.ctx.js.consumer_info(self.ctx.layout.streams[0], self.ctx.spec.group)
            await self.ctx.js.stream_info(f"KV_{self.bucket}")
        except NotFoundError:
            return False
        except Exception:  # cannot tell now: assume it does, and look again later
            return True
        return True

    async def _members(self) -> list[str]:
        prefix = f"$KV.{self.bucket}.m."
        info = await self.ctx.js.stream_info(f"KV_{self.bucket}", subjects_filter=f"{prefix}>")
        return sorted(s[len(prefix) :] for s in (info.state.subjects or {}))

    async def _rebalance(self) -> None:
        async with self._lock:
            if self.left:
                return
            await self.kv.put(f"m.{self.token}", self._value)
            members = await self._members()
            if self.token not in members:
                members = sorted([*members, self.token])
            index, count = members.index(self.token), len(members)
            self.desired = {p for p in range(len(self.parts)) if p % count == index}
            released = False
            for part in self.parts:
                now = time.monotonic()
                if part.owned:
                    if part.p not in self.desired and not part.releasing:
                        part.releasing = True
                        part.release_by = now + self.session_timeout
                    idle = not part.batch and not self.puller.outstanding(part.p)
                    if part.releasing and (idle or now > part.release_by):
                        await self._release(part)
                        released = True
                    else:
                        await self._refresh(part)
                elif part.p in self.desired:
                    await self._claim(part)
            await self._keep_leases()
            if released:
                await self._announce()
            self.signal.set()

    async def _claim(self, part: _Part) -> None:
        try:
            part.rev = await self.kv.create(f"p.{part.p}", self._value)
        except KeyWrongLastSequenceError:
            return  # someone else owns it (until they hand it back or their lease runs out)
        stale = self.puller.buffers[part.p]  # late deliveries from an earlier ownership
        while stale:
            await self.puller.settle(stale.popleft().msg.reply, NAK)
        part.owned, part.releasing, part.waiting = True, False, False
        part.epoch += 1
        part.batch, part.prefix = [], 0
        part.paused_until = part.gap_check_at = 0.0
        with contextlib.suppress(NotFoundError, ValueError):
            entry = await self.kv.get(f"d.{part.p}")
            remaining = float((entry.value or b"0").decode()) - time.time()
            if remaining > 0:
                part.paused_until = time.monotonic() + remaining
        info = await self.ctx.js.consumer_info(self.ctx.layout.streams[part.p], self.ctx.spec.group)
        # Messages still pending belong to a previous owner: the first of them comes next.
        part.expected = info.ack_floor.stream_seq if info.num_ack_pending else None

    async def _refresh(self, part: _Part) -> None:
        try:
            part.rev = await self.kv.update(f"p.{part.p}", self._value, last=part.rev)
        except KeyWrongLastSequenceError:
            log.warning(
                "group %s member %s lost partition %d (its lease ran out)",
                self.ctx.spec.group,
                self.name,
                part.p,
            )
            await self._return_held(part)
            part.owned = part.releasing = False
            return
        remaining = part.paused_until - time.monotonic()
        if remaining > 0:
            await self.kv.put(f"d.{part.p}", str(time.time() + remaining).encode())

    async def _release(self, part: _Part) -> None:
        await self._return_held(part)
        with contextlib.suppress(APIError):
            await self.kv.delete(f"p.{part.p}", last=part.rev)
        part.owned = part.releasing = False

    async def _return_held(self, part: _Part) -> None:
        """Give back, in offset order, everything of the partition not committed yet."""
        batch = part.batch
        if batch:
            batch[0]._batch.cancelled = True
        buffer = self.puller.buffers[part.p]
        replies = [d._reply for d in batch[part.prefix :]]
        replies += [a.msg.reply for a in sorted(buffer, key=_offset)]
        buffer.clear()
        part.batch, part.prefix, part.expected, part.waiting = [], 0, None, False
        for reply in replies:
            await self.puller.settle(reply, NAK)

    async def _keep_leases(self) -> None:
        for part in self.parts:
            if part.owned:
                for delivery in part.batch[part.prefix :]:
                    await self.puller.settle(delivery._reply, WPI)
                for arrival in self.puller.buffers[part.p]:
                    await self.puller.settle(arrival.msg.reply, WPI)

    # -- fetching ---------------------------------------------------------------------------------

    async def _arrived(self, p: int) -> None:
        part = self.parts[p]
        if not part.owned or self.left:
            # A late delivery for a partition this member gave back: return it at once.
            buffer = self.puller.buffers[p]
            while buffer:
                await self.puller.settle(buffer.popleft().msg.reply, NAK)
            return
        self.signal.set()
        if part.releasing and not self.puller.outstanding(p):
            self._kick.set()

    def _pullable(self, now: float) -> list[int]:
        return [
            part.p
            for part in self.parts
            if part.owned
            and not part.releasing
            and not part.batch
            and part.paused_until <= now
            and (part.waiting or not self.puller.buffers[part.p])
            and not self.puller.outstanding(part.p)
        ]

    def _wake_at(self, now: float) -> float:
        times = [part.paused_until for part in self.parts if part.owned and part.paused_until > now]
        times += [part.gap_check_at for part in self.parts if part.owned and part.waiting]
        return min(times, default=float("inf"))

    async def _collect(self, max_messages: int) -> list[Received]:
        out: list[Received] = []
        owned = [part.p for part in self.parts if part.owned and not part.releasing]
        for p in self._partitions_in_turn(owned):
            part = self.parts[p]
            if len(out) >= max_messages:
                break
            if part.batch or part.paused_until > time.monotonic() or not self.puller.buffers[p]:
                continue
            epoch = part.epoch
            arrivals = await self._accept(part, max_messages - len(out))
            if not arrivals:
                continue
            if part.epoch != epoch or not part.owned:  # lost while asking the consumer
                buffer = self.puller.buffers[p]
                for arrival in [*arrivals, *sorted(buffer, key=_offset)]:
                    await self.puller.settle(arrival.msg.reply, NAK)
                buffer.clear()
                continue
            batch = _Batch()
            part.batch = [
                OrderedDelivery(self, self.ctx.message(a, p), a.meta.delivered, p, a.msg.reply, epoch, batch)
                for a in arrivals
            ]
            part.prefix = 0
            out.extend(part.batch)
        return out

    async def _accept(self, part: _Part, room: int) -> list[Arrival]:
        """The next messages of the partition in offset order, without holes (but see below)."""
        buffer = self.puller.buffers[part.p]
        purged = self.puller.purged_below[part.p] - 1  # as an offset
        if part.expected is not None and part.expected < purged:
            part.expected = purged  # the offsets in between were purged: no hole to wait for
        unique: list[Arrival] = []
        for arrival in sorted(buffer, key=_offset):
            if part.expected is not None and arrival.offset < part.expected:
                continue  # a second copy of a message this member holds or finished
            if unique and unique[-1].offset == arrival.offset:
                unique[-1] = arrival  # the later delivery is the one JetStream tracks
            else:
                unique.append(arrival)
        buffer.clear()
        if not unique:
            return []
        if part.expected is not None and unique[0].offset > part.expected:
            # A hole: either earlier messages are still pending (a previous owner's batch
            # not yet redelivered, or our own nak'ed ones), or they were deleted.
            now = time.monotonic()
            missing = now < part.gap_check_at or await self._pending_elsewhere(part, len(unique))
            if missing:
                part.waiting = True
                buffer.extend(unique)
                return []
        part.waiting = False
        taken = [unique[0]]
        for arrival in unique[1:]:
            if len(taken) >= room or arrival.offset != taken[-1].offset + 1:
                break
            taken.append(arrival)
        buffer.extend(unique[len(taken) :])
        part.expected = taken[-1].offset + 1
        return taken

    async def _pending_elsewhere(self, part: _Part, held: int) -> bool:
        part.gap_check_at = time.monotonic() + _GAP_CHECK_S
        info = await self.ctx.js.consumer_info(self.ctx.layout.streams[part.p], self.ctx.spec.group)
        return (info.num_ack_pending or 0) > held

    # -- settling ---------------------------------------------------------------------------------

    def _owned(self, delivery: OrderedDelivery) -> _Part:
        if delivery.settled is not None:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        part = self.parts[delivery.partition]
        if self.left or delivery._batch.cancelled or not part.owned or part.epoch != delivery._epoch:
            raise DeliveryNotOwnedError(
                f"{delivery!r}: member {self.name!r} no longer reads partition {delivery.partition} "
                "from this batch (rebalanced, rewound or left)"
            )
        return part

    async def _advance(self, part: _Part) -> None:
        """Commit (send the acks of) the settled prefix of the batch."""
        batch = part.batch
        sends: list[tuple[str, bytes]] = []
        i = part.prefix
        while i < len(batch) and batch[i].settled in (ACK, TERM):
            sends.append((batch[i]._reply, batch[i].settled))  # type: ignore[arg-type]
            i += 1
        part.prefix = i
        if batch and i == len(batch):
            part.batch, part.prefix = [], 0
            self.signal.set()
            if part.releasing:
                self._kick.set()
        for reply, verb in sends:
            await self.puller.settle(reply, verb)

    async def _ack(self, delivery: OrderedDelivery) -> None:
        part = self._owned(delivery)
        delivery.settled = ACK
        self.ctx.transport.failures.pop(self.ctx.failure_key(delivery.partition, delivery.offset))
        await self._advance(part)

    async def _nack(
        self, delivery: OrderedDelivery, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        part = self._owned(delivery)
        key = self.ctx.failure_key(delivery.partition, delivery.offset)
        failures = self.ctx.transport.failures.note(key, error)
        max_deliver = self.ctx.spec.max_deliver
        if max_deliver is not None and delivery.delivery_count >= max_deliver:
            await self.ctx.give_up(delivery.message, delivery.delivery_count, failures)
            self.ctx.transport.failures.pop(key)
            delivery.settled = TERM
            await self._advance(part)
            return
        delivery.settled = NAK
        await self._rewind(part, delivery, delay)

    async def _rewind(self, part: _Part, failed: OrderedDelivery, delay: float | None) -> None:
        """Commit the settled prefix; everything from the first unsettled (or the failed)
        message on is delivered again, in order, after the delay."""
        batch = part.batch
        sends: list[tuple[str, bytes]] = []
        i = part.prefix
        while i < len(batch) and batch[i].settled in (ACK, TERM):
            sends.append((batch[i]._reply, batch[i].settled))  # type: ignore[arg-type]
            i += 1
        back = batch[i:]
        batch[0]._batch.cancelled = True
        buffer = self.puller.buffers[part.p]
        later = [a.msg.reply for a in sorted(buffer, key=_offset)]
        buffer.clear()
        part.batch, part.prefix, part.waiting = [], 0, False
        part.expected = back[0].offset
        if delay is None:
            backoff = self.ctx.spec.backoff
            delay = backoff.delay(failed.delivery_count) if backoff else 0.0
        if delay > 0:
            part.paused_until = time.monotonic() + delay
        for reply, verb in sends:
            await self.puller.settle(reply, verb)
        for reply in [d._reply for d in back] + later:
            await self.puller.settle(reply, NAK)
        if delay > 0:
            with contextlib.suppress(Exception):  # a new owner would merely not wait
                await self.kv.put(f"d.{part.p}", str(time.time() + delay).encode())
        self.signal.set()

    async def _term(self, delivery: OrderedDelivery, reason: BaseException | str | None) -> None:
        part = self._owned(delivery)
        key = self.ctx.failure_key(delivery.partition, delivery.offset)
        failures = self.ctx.transport.failures.note(key, reason or "terminated")
        await self.ctx.give_up(delivery.message, delivery.delivery_count, failures)
        self.ctx.transport.failures.pop(key)
        delivery.settled = TERM
        await self._advance(part)

    async def _in_progress(self, delivery: OrderedDelivery) -> None:
        self._owned(delivery)
        await self.puller.settle(delivery._reply, WPI)

    # -- leaving ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Leave: commit what was acknowledged, give back the rest, hand the partitions over."""
        if self.left:
            return
        self.left = "it left"
        if self._task is not None:
            self._kick.set()
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.ctx.options.request_timeout_s + self.heartbeat_s)
        notifications = self._notifications
        if notifications is not None:
            with contextlib.suppress(Exception):
                await notifications.unsubscribe()  # type: ignore[attr-defined]
        await self.puller.stop()
        if not self.ctx.nc.is_closed:
            try:
                async with self._lock:
                    for part in self.parts:
                        if part.owned:
                            await self._return_held(part)
                            with contextlib.suppress(APIError):
                                await self.kv.delete(f"p.{part.p}", last=part.rev)
                            part.owned = False
                    await self.ctx.js.purge_stream(
                        f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.m.{self.token}"
                    )
                await self._announce()
            except Exception as error:  # the leases run out after the session timeout anyway
                log.debug(
                    "group %s member %s: leaving cleanly failed: %r", self.ctx.spec.group, self.name, error
                )
        self.ctx.transport.forget_member(self)


def _offset(arrival: Arrival) -> int:
    return arrival.offset
