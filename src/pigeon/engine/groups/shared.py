"""Shared groups: queue semantics over all partitions, with leases, redelivery and dead letters.

Each message is leased to one member for ``ack_wait``. Settling it is durable (an event in
the group's state log). Per partition the group keeps a *floor* (every offset below it is
done), the done offsets above the floor, and the delivery count of every message delivered
but not done. Leases live in memory only: after a restart every unfinished message is simply
delivered again, with its delivery count carried on.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ...errors import AlreadySettledError, MemberNotFoundError
from ...message import Message
from ..stream import Stream
from .base import DeadLetterSink, GroupBase, check_fetch, check_nack_delay
from .config import SharedGroupConfig
from .deadletter import Failures
from .delivery import Delivery
from .lag import PartitionLag
from .statelog import ACK, COMMIT, DELIVER, NACK, TERM, StateLog

_EXPIRY_TICK_S = 0.05


class _PartitionState:
    __slots__ = ("counts", "cursor", "done", "floor", "not_before")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.cursor = floor
        self.done: set[int] = set()
        self.counts: dict[int, int] = {}  # delivered but not done -> deliveries so far
        self.not_before: dict[int, int] = {}  # nacked with a delay -> wall-clock ns

    def finish(self, offset: int) -> bool:
        """Mark ``offset`` done; True when it had been delivered (it was unfinished)."""
        delivered = self.counts.pop(offset, None) is not None
        self.not_before.pop(offset, None)
        if offset == self.floor:
            self.floor += 1
            while self.floor in self.done:
                self.done.remove(self.floor)
                self.floor += 1
        elif offset > self.floor:
            self.done.add(offset)
        return delivered

    def skip_to(self, offset: int) -> None:
        """Retention removed everything below ``offset``: it can no longer be delivered."""
        if offset > self.floor:
            self.floor = offset
            self.done = {o for o in self.done if o > offset}
            self.counts = {o: c for o, c in self.counts.items() if o >= offset}
            self.not_before = {o: t for o, t in self.not_before.items() if o >= offset}
            while self.floor in self.done:
                self.done.remove(self.floor)
                self.floor += 1
        self.cursor = max(self.cursor, offset)


class SharedGroup(GroupBase):
    def __init__(
        self,
        stream: Stream,
        config: SharedGroupConfig,
        state: StateLog,
        dead_letters: DeadLetterSink | None,
        dead_letter_subject: str,
        start_offsets: list[int],
    ) -> None:
        super().__init__(stream, config, state, dead_letters, dead_letter_subject)
        self.config = config
        self._parts = [_PartitionState(offset) for offset in start_offsets]
        self._leases: dict[tuple[int, int], Delivery] = {}  # leased now, by partition and offset
        self._ready: list[tuple[float, int, int]] = []  # (monotonic time, partition, offset)
        # (deadline, lease, partition, offset). Every deadline is now + ack_wait, so leases
        # expire in the order they were (re)armed; tuples let settled deliveries be freed.
        self._expiry: deque[tuple[float, int, int, int]] = deque()
        self._members: dict[str, SharedMember] = {}
        # key_ordered: the one message (partition, offset) that holds each key, and the
        # messages of held keys waiting behind it, in offset order
        self._key_owner: dict[str, tuple[int, int]] = {}
        self._parked: dict[str, deque[Message]] = {}
        self._parked_count = 0
        self._released: deque[Message] = deque()
        self._next_lease = 0
        self._next_member = 0
        self._expiry_task: asyncio.Task[None] | None = None
        self._scan_start = 0
        self._unfinished = 0
        self._exhausted: list[Message] = []  # delivered max_deliver times already: to bury
        self._bytes_left: int | None = None

    # -- durable state -------------------------------------------------------------------------

    def restore(self, snapshot: dict[str, Any] | None, events: list[tuple[int, int, int, int]]) -> None:
        # Where the group started is in its events (or the snapshot), not in today's "latest".
        self._parts = [_PartitionState(0) for _ in self._parts]
        if snapshot is not None:
            for st, saved in zip(self._parts, snapshot["partitions"], strict=True):
                st.floor = st.cursor = saved["floor"]
                st.done = set(saved["done"])
                st.counts = {int(o): c for o, c in saved["counts"].items()}
                st.not_before = {int(o): t for o, t in saved["not_before"].items()}
        for kind, p, offset, value in events:
            st = self._parts[p]
            if kind == COMMIT:  # where a new group starts
                st.skip_to(offset)
                continue
            if offset < st.floor or offset in st.done:
                continue
            if kind == DELIVER:
                st.counts[offset] = st.counts.get(offset, 0) + 1
            elif kind in (ACK, TERM):
                st.finish(offset)
            elif kind == NACK and value:
                st.not_before[offset] = value
        for st in self._parts:
            st.cursor = st.floor  # rescan: unfinished messages are found again in offset order
        self._recount()

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            "partitions": [
                {
                    "floor": st.floor,
                    "done": sorted(st.done),
                    "counts": st.counts,
                    "not_before": st.not_before,
                }
                for st in self._parts
            ]
        }

    async def _flush(self) -> None:
        await self._state.flush()
        await self._state.maybe_snapshot(self._snapshot_state)

    # -- members and fetching --------------------------------------------------------------------

    def member(self, name: str | None = None) -> SharedMember:
        """A member of this group (members of a shared group need no heartbeats: leases expire)."""
        self._check_open()
        if name is None:
            self._next_member += 1
            name = f"member-{self._next_member}"
        member = self._members.get(name)
        if member is None:
            member = self._members[name] = SharedMember(self, name)
        return member

    @property
    def ack_pending(self) -> int:
        """Messages delivered and not yet finished (what ``max_ack_pending`` bounds)."""
        return self._unfinished

    def _recount(self) -> None:
        self._unfinished = sum(len(st.counts) for st in self._parts)

    async def _fetch(
        self, member: SharedMember, max_messages: int, timeout: float, max_bytes: int | None
    ) -> list[Delivery]:
        check_fetch(max_messages, timeout, max_bytes)
        deadline = time.monotonic() + timeout
        while True:
            self._check_open()
            if member.left:
                raise MemberNotFoundError(f"member {member.name!r} left group {self.name!r}")
            out = self._collect(member, max_messages, max_bytes)
            if self._exhausted:
                await self._bury_exhausted()
            if out:
                await self._flush()
                return out
            wake_at = min(deadline, self._ready[0][0]) if self._ready else deadline
            if not await self._wait(wake_at) and time.monotonic() >= deadline:
                return []

    def _room(self, member: SharedMember, max_messages: int) -> int:
        limit = self.config.max_member_pending
        return max_messages if limit is None else min(max_messages, limit - member.pending)

    def _collect(self, member: SharedMember, max_messages: int, max_bytes: int | None) -> list[Delivery]:
        out: list[Delivery] = []
        room = self._room(member, max_messages)
        if room <= 0:
            return out
        self._bytes_left = max_bytes
        now = time.monotonic()
        ready = self._ready
        while ready and ready[0][0] <= now and len(out) < room:
            _, p, offset = heapq.heappop(ready)
            st = self._parts[p]
            if (p, offset) in self._leases or offset not in st.counts:
                continue
            found = self.stream.partitions[p].fetch(offset, 1)
            if not found or found[0].offset != offset:
                self._finish(p, offset, None, TERM)  # removed by retention meanwhile
                continue
            self._offer(member, found[0], now, out)
        limit = self.config.max_ack_pending
        while self._released and len(out) < room and self.ack_pending < limit and self._has_byte_room(out):
            self._offer(member, self._released.popleft(), now, out)
        for p in self._partition_order():
            if len(out) >= room or self.ack_pending >= limit or not self._has_byte_room(out):
                break
            self._scan(member, p, room, out, now)
        return out

    def _has_byte_room(self, out: list[Delivery]) -> bool:
        return self._bytes_left is None or self._bytes_left > 0 or not out

    def _offer(self, member: SharedMember, message: Message, now: float, out: list[Delivery]) -> None:
        """Deliver ``message``, unless it was delivered max_deliver times already (then it is
        buried: that happens after a restart or a member leaving mid-delivery)."""
        assert message.partition is not None and message.offset is not None
        max_deliver = self.config.max_deliver
        if (
            max_deliver is not None
            and self._parts[message.partition].counts.get(message.offset, 0) >= max_deliver
        ):
            self._hold_key(message)
            self._exhausted.append(message)
            return
        out.append(self._deliver(member, message, now))
        if self._bytes_left is not None:
            self._bytes_left -= len(message.payload)

    async def _bury_exhausted(self) -> None:
        exhausted, self._exhausted = self._exhausted, []
        for message in exhausted:
            assert message.partition is not None and message.offset is not None
            p, offset = message.partition, message.offset
            count = self._parts[p].counts.get(offset, 0)
            failures = self._failures.get((p, offset)) or Failures()
            if not failures.error_type:
                failures.note(f"delivered {count} times (max_deliver) without an outcome", time.time())
            if self.config.dead_letter:
                await self._send_dead_letter(message, count, failures)
            self._finish(p, offset, message, TERM)
        await self._flush()

    def _partition_order(self) -> list[int]:
        # Start at a different partition each time so that one busy partition cannot starve others.
        n = len(self._parts)
        self._scan_start = (self._scan_start + 1) % n
        return [(self._scan_start + i) % n for i in range(n)]

    def _scan(self, member: SharedMember, p: int, room: int, out: list[Delivery], now: float) -> None:
        st = self._parts[p]
        partition = self.stream.partitions[p]
        limit = self.config.max_ack_pending
        key_ordered = self.config.key_ordered
        while len(out) < room and self.ack_pending < limit and st.cursor < partition.next_offset:
            if key_ordered and self._parked_count >= limit:
                return
            messages = partition.fetch(st.cursor, room - len(out), self._bytes_left)
            if not messages:
                st.skip_to(partition.next_offset)
                self._recount()
                return
            assert messages[0].offset is not None
            if messages[0].offset > st.cursor:
                st.skip_to(messages[0].offset)
                self._recount()
            for message in messages:
                if len(out) >= room or self.ack_pending >= limit or not self._has_byte_room(out):
                    return
                assert message.offset is not None
                offset = message.offset
                st.cursor = offset + 1
                if offset in st.done:
                    continue
                if (
                    key_ordered
                    and message.key is not None
                    and (message.key in self._key_owner or message.key in self._parked)
                ):
                    self._parked.setdefault(message.key, deque()).append(message)
                    self._parked_count += 1
                    continue
                not_before = st.not_before.get(offset)
                if not_before is not None and not_before > time.time_ns():
                    self._hold_key(message)
                    heapq.heappush(self._ready, (now + (not_before - time.time_ns()) / 1e9, p, offset))
                    continue
                self._offer(member, message, now, out)

    def _hold_key(self, message: Message) -> None:
        if self.config.key_ordered and message.key is not None:
            assert message.partition is not None and message.offset is not None
            self._key_owner[message.key] = (message.partition, message.offset)

    def _deliver(self, member: SharedMember, message: Message, now: float) -> Delivery:
        assert message.partition is not None and message.offset is not None
        p, offset = message.partition, message.offset
        st = self._parts[p]
        self._hold_key(message)
        count = st.counts.get(offset, 0) + 1
        if count == 1 and offset not in st.counts:
            self._unfinished += 1
        st.counts[offset] = count
        self._next_lease += 1
        delivery = Delivery(message, self.name, count, self, self._next_lease)
        delivery.holder = member
        delivery.deadline = now + self.config.ack_wait_s
        self._leases[(p, offset)] = delivery
        self._expiry.append((delivery.deadline, delivery.lease, p, offset))
        member.pending += 1
        self._state.record(DELIVER, p, offset)
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases())
        return delivery

    # -- settling --------------------------------------------------------------------------------

    def _take_lease(self, delivery: Delivery) -> None:
        leased = self._leases.get((delivery.partition, delivery.offset))
        self._check_settle(delivery, None if leased is None else leased.lease)
        delivery.settled = True
        del self._leases[(delivery.partition, delivery.offset)]
        _holder(delivery).pending -= 1

    def _finish(self, p: int, offset: int, message: Message | None, kind: int) -> None:
        if self._parts[p].finish(offset):
            self._unfinished -= 1
        self._failures.pop((p, offset), None)
        self._state.record(kind, p, offset)
        if (
            message is not None
            and message.key is not None
            and self._key_owner.get(message.key) == (p, offset)
        ):
            del self._key_owner[message.key]
            parked = self._parked.get(message.key)
            if parked:
                released = parked.popleft()
                self._parked_count -= 1
                if not parked:
                    del self._parked[message.key]
                self._hold_key(released)
                self._released.append(released)
        self._wake()

    async def _ack(self, delivery: Delivery) -> None:
        self._take_lease(delivery)
        self._finish(delivery.partition, delivery.offset, delivery.message, ACK)
        await self._flush()

    async def _ack_batch(self, deliveries: list[Delivery]) -> None:
        seen = set()
        for delivery in deliveries:  # all or nothing: check every one before settling any
            leased = self._leases.get((delivery.partition, delivery.offset))
            self._check_settle(delivery, None if leased is None else leased.lease)
            if id(delivery) in seen:
                raise AlreadySettledError(f"{delivery!r} appears twice in the batch")
            seen.add(id(delivery))
        for delivery in deliveries:
            self._take_lease(delivery)
            self._finish(delivery.partition, delivery.offset, delivery.message, ACK)
        await self._flush()

    async def _nack(self, delivery: Delivery, delay: float | None, error: BaseException | str | None) -> None:
        check_nack_delay(delay)
        self._take_lease(delivery)
        await self._failed(delivery, error, delay)
        await self._flush()

    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None:
        self._take_lease(delivery)
        failures = self._note_failure(delivery, reason or "terminated")
        if self.config.dead_letter:
            await self._send_to_dead_letters(delivery, failures)
        self._finish(delivery.partition, delivery.offset, delivery.message, TERM)
        await self._flush()

    async def _in_progress(self, delivery: Delivery) -> None:
        leased = self._leases.get((delivery.partition, delivery.offset))
        self._check_settle(delivery, None if leased is None else leased.lease)
        delivery.deadline = time.monotonic() + self.config.ack_wait_s
        self._expiry.append((delivery.deadline, delivery.lease, delivery.partition, delivery.offset))

    async def _failed(
        self, delivery: Delivery, error: BaseException | str | None, delay: float | None
    ) -> None:
        """A delivery failed (nack or expired lease): redeliver later, or give up on it."""
        p, offset = delivery.partition, delivery.offset
        failures = self._note_failure(delivery, error)
        count = self._parts[p].counts.get(offset, delivery.delivery_count)
        max_deliver = self.config.max_deliver
        if max_deliver is not None and count >= max_deliver:
            if self.config.dead_letter:
                await self._send_to_dead_letters(delivery, failures)
            self._finish(p, offset, delivery.message, TERM)
            return
        if delay is None:
            delay = self.config.backoff.delay(count) if self.config.backoff else 0.0
        if delay > 0:
            not_before = time.time_ns() + int(delay * 1e9)
            self._parts[p].not_before[offset] = not_before
            self._state.record(NACK, p, offset, not_before)
        heapq.heappush(self._ready, (time.monotonic() + delay, p, offset))
        self._wake()

    async def _expire_leases(self) -> None:
        while not self._closed:
            now = time.monotonic()
            expired = []
            while self._expiry and self._expiry[0][0] <= now:
                _, lease, p, offset = self._expiry.popleft()
                # Skip leases settled or re-leased meanwhile; an extended one is queued again.
                delivery = self._leases.get((p, offset))
                if (
                    delivery is not None
                    and delivery.lease == lease
                    and delivery.deadline <= now
                    and delivery not in expired
                ):
                    expired.append(delivery)
            for delivery in expired:
                del self._leases[(delivery.partition, delivery.offset)]
                _holder(delivery).pending -= 1
                delivery.cancelled.set()
                await self._failed(
                    delivery, f"not acknowledged within ack_wait ({self.config.ack_wait_s}s)", None
                )
            if expired:
                await self._flush()
            next_deadline = self._expiry[0][0] - now if self._expiry else _EXPIRY_TICK_S
            await asyncio.sleep(max(0.001, min(_EXPIRY_TICK_S, next_deadline)))

    async def _release_member(self, member: SharedMember) -> None:
        """A member left: its leased messages are redelivered at once (max_deliver still holds)."""
        member.left = True
        for key, delivery in list(self._leases.items()):
            if delivery.holder is member:
                del self._leases[key]
                delivery.cancelled.set()
                await self._failed(delivery, f"member {member.name!r} left", 0.0)
        member.pending = 0
        self._members.pop(member.name, None)
        await self._flush()
        self._wake()

    # -- observing ---------------------------------------------------------------------------------

    def lag(self) -> list[PartitionLag]:
        in_flight = [0] * len(self._parts)
        for p, _ in self._leases:
            in_flight[p] += 1
        out = []
        for p, st in enumerate(self._parts):
            head = self.stream.partitions[p].next_offset
            committed = min(st.floor, head)
            unfinished = max(0, head - committed - len(st.done))
            waiting = len(st.counts) - in_flight[p]
            out.append(
                PartitionLag(
                    partition=p,
                    head=head,
                    committed=committed,
                    lag=head - committed,
                    pending=max(0, unfinished - in_flight[p] - waiting),
                    in_flight=in_flight[p],
                    waiting=waiting,
                )
            )
        return out

    def members(self) -> list[str]:
        return sorted(self._members)

    async def close(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        await super().close()


class SharedMember:
    """One consumer in a shared group: fetch deliveries (pull), iterate them, or consume (push)."""

    def __init__(self, group: SharedGroup, name: str) -> None:
        self.group = group
        self.name = name
        self.pending = 0
        self.left = False

    async def fetch(
        self, max_messages: int = 100, timeout: float = 5.0, *, max_bytes: int | None = None
    ) -> list[Delivery]:
        """Long-poll: up to ``max_messages`` deliveries (and about ``max_bytes`` of payload, at
        least one message) as soon as any exist, or [] after ``timeout``."""
        return await self.group._fetch(self, max_messages, timeout, max_bytes)

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while True:
            for delivery in await self.fetch(100, 5.0):
                yield delivery

    async def ack_batch(self, deliveries: list[Delivery]) -> None:
        """Acknowledge many deliveries at once: one state-log write instead of one per message."""
        await self.group._ack_batch(deliveries)

    async def leave(self) -> None:
        await self.group._release_member(self)


def _holder(delivery: Delivery) -> SharedMember:
    assert isinstance(delivery.holder, SharedMember)
    return delivery.holder
