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

from ...errors import AlreadySettledError, MemberNotFoundError, PigeonError
from ...message import Message
from ..partition import Partition
from ..stream import Stream
from .base import DeadLetterSink, GroupBase, check_fetch, check_nack_delay
from .config import SharedGroupConfig
from .deadletter import Failures
from .delivery import Delivery
from .lag import PartitionLag
from .statelog import ACK, COMMIT, DELIVER, NACK, TERM, StateLog

_EXPIRY_TICK_S = 0.05
# Reading the log decodes whole record batches: what a fetch decodes beyond its need (up to
# this many messages, and this much payload) is kept for the next fetch instead of decoded again.
_READ_AHEAD = 1000
_READ_AHEAD_BYTES = 1 << 20


class _PartitionState:
    __slots__ = ("ahead", "ahead_from", "counts", "cursor", "done", "floor", "leased", "not_before")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.cursor = floor
        self.done: set[int] = set()
        # Delivered but not done: leased now -> its delivery (whose delivery_count is the
        # count), or else -> deliveries so far. An offset is in one of the two at most.
        self.leased: dict[int, Delivery] = {}
        self.counts: dict[int, int] = {}
        self.not_before: dict[int, int] = {}  # nacked with a delay -> wall-clock ns
        # messages read ahead: what reading the log returns next, once the cursor is at
        # ahead_from (just after the messages read with them)
        self.ahead: list[Message] = []
        self.ahead_from = -1

    def finish(self, offset: int) -> bool:
        """Mark ``offset`` (not leased) done; True when it had been delivered (it was unfinished)."""
        delivered = self.counts.pop(offset, None) is not None
        if self.not_before:
            self.not_before.pop(offset, None)
        floor = self.floor
        if offset == floor:
            floor += 1
            done = self.done
            if done:
                while floor in done:
                    done.remove(floor)
                    floor += 1
            self.floor = floor
        elif offset > floor:
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
        self._ready: list[tuple[float, int, int]] = []  # (monotonic time, partition, offset)
        # (deadline, partition, first offset, end offset): the leases armed together (a run of
        # consecutive offsets delivered by one fetch, or one extended lease). Every deadline is
        # now + ack_wait, so entries expire in the order they were armed; a lease settled,
        # extended or re-leased meanwhile is recognised by its delivery's own deadline.
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
            elif kind == DELIVER:  # one more delivery of each offset of a run (value 0: one offset)
                counts, done, floor = st.counts, st.done, st.floor
                for o in range(max(offset, floor), offset + (value or 1)):
                    if o not in done:
                        counts[o] = counts.get(o, 0) + 1
            elif offset < st.floor or offset in st.done:
                continue
            elif kind in (ACK, TERM):
                st.finish(offset)
            elif kind == NACK and value:
                st.not_before[offset] = value
        # What was delivered before the restart comes back through the ready queue: its
        # messages are unfinished already, so max_ack_pending (which they may fill) must not
        # hold them back, as it holds back a scan. The rescan from the floor finds the rest
        # (messages parked behind a key) and steps over what the ready queue leased.
        now, wall = time.monotonic(), time.time_ns()
        for p, st in enumerate(self._parts):
            st.cursor = st.floor
            for offset in st.counts:
                delay_ns = st.not_before.get(offset, wall) - wall
                self._ready.append((now + max(0, delay_ns) / 1e9, p, offset))
        heapq.heapify(self._ready)
        self._recount()

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            "partitions": [
                {
                    "floor": st.floor,
                    "done": sorted(st.done),
                    "counts": st.counts | {
                        o: d.delivery_count for o, d in st.leased.items() if o >= st.floor
                    },
                    "not_before": st.not_before,
                }
                for st in self._parts
            ]
        }

    async def _flush(self) -> None:
        state = self._state
        await state.flush()
        if state.until_snapshot <= 0:
            await state.maybe_snapshot(self._snapshot_state)

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

    def member_names(self) -> list[str]:
        """The members that fetched from this group (shared members hold no partitions)."""
        return sorted(self._members)

    @property
    def ack_pending(self) -> int:
        """Messages delivered and not yet finished (what ``max_ack_pending`` bounds)."""
        return self._unfinished

    def _recount(self) -> None:
        self._unfinished = sum(len(st.counts) + len(st.leased) for st in self._parts)

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
            if offset in st.leased or offset not in st.counts:
                continue
            found = self.stream.partitions[p].fetch(offset, 1)
            if not found or found[0].offset != offset:
                self._finish(p, offset, None, TERM)  # removed by retention meanwhile
                continue
            self._offer(member, found[0], now, out)
        limit = self.config.max_ack_pending
        while self._released and len(out) < room and self._unfinished < limit and self._has_byte_room(out):
            self._offer(member, self._released.popleft(), now, out)
        for p in self._partition_order():
            if len(out) >= room or self._unfinished >= limit or not self._has_byte_room(out):
                break
            self._scan(member, p, room, out, now)
        if out and self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases())
        return out

    def _has_byte_room(self, out: list[Delivery]) -> bool:
        return self._bytes_left is None or self._bytes_left > 0 or not out

    def _offer(self, member: SharedMember, message: Message, now: float, out: list[Delivery]) -> None:
        """Deliver ``message``, unless it was delivered max_deliver times already (then it is
        buried: that happens after a restart or a member leaving mid-delivery)."""
        assert message.partition is not None and message.offset is not None
        p, offset = message.partition, message.offset
        st = self._parts[p]
        previous = st.counts.get(offset)
        max_deliver = self.config.max_deliver
        if max_deliver is not None and previous is not None and previous >= max_deliver:
            self._hold_key(message)
            self._exhausted.append(message)
            return
        self._hold_key(message)
        if previous is None:
            previous = 0
            self._unfinished += 1
        else:
            del st.counts[offset]
        self._next_lease += 1
        deadline = now + self.config.ack_wait_s
        delivery = Delivery(message, self.name, previous + 1, self, self._next_lease, None, member, deadline)
        st.leased[offset] = delivery
        self._expiry.append((deadline, p, offset, offset + 1))
        member.pending += 1
        self._state.record(DELIVER, p, offset, 1)
        out.append(delivery)
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
        if st.cursor < st.floor:  # what a restart left to rescan was finished through the ready queue
            st.cursor = st.floor
        while len(out) < room and self._unfinished < limit and st.cursor < partition.next_offset:
            if key_ordered and self._parked_count >= limit:
                return
            messages = self._read(st, partition, room - len(out))
            if not messages:
                st.skip_to(partition.next_offset)
                self._recount()
                return
            assert messages[0].offset is not None
            if messages[0].offset > st.cursor:
                st.skip_to(messages[0].offset)
                self._recount()
            if (
                self._deliver_plain(member, p, st, messages, room, out, now)
                if not key_ordered and not st.not_before and self._bytes_left is None
                else self._deliver_scanned(member, p, st, messages, room, out, now)
            ):
                return

    def _read(self, st: _PartitionState, partition: Partition, want: int) -> list[Message]:
        """Up to ``want`` messages from the cursor on: `Partition.fetch`, reading ahead.

        Read-ahead messages are used only while they are exactly what the log would return:
        from the cursor they were read for, none removed by retention since (retention
        removes the oldest segments; per-subject limits, which hide messages one by one, get
        no read-ahead).
        """
        ahead = st.ahead
        if ahead:
            st.ahead = []
            if st.ahead_from == st.cursor and ahead[0].offset >= partition.first_offset:  # type: ignore[operator]
                if len(ahead) > want:
                    st.ahead = ahead[want:]
                    del ahead[want:]
                    st.ahead_from = ahead[-1].offset + 1  # type: ignore[operator]
                else:
                    # Used up: read on while the loop is idle (a consumer works on what it
                    # fetched), so that its next fetch does not wait for the log's decoding.
                    asyncio.get_running_loop().call_later(0, self._read_ahead, st, partition)
                return ahead
        if want >= _READ_AHEAD or self._bytes_left is not None or partition.recent_by_subject is not None:
            return partition.fetch(st.cursor, want, self._bytes_left)
        messages = partition.fetch(st.cursor, _READ_AHEAD)
        if len(messages) > want:
            rest = messages[want:]
            del messages[want:]
            if sum([len(m.payload) for m in rest]) <= _READ_AHEAD_BYTES:
                st.ahead = rest
                st.ahead_from = messages[-1].offset + 1  # type: ignore[operator]
        return messages

    def _read_ahead(self, st: _PartitionState, partition: Partition) -> None:
        if self._closed or st.ahead or partition.recent_by_subject is not None:
            return
        try:
            messages = partition.fetch(st.cursor, _READ_AHEAD)
        except (PigeonError, OSError, ValueError):
            return  # a damaged log, or one closed meanwhile: the next read proper reports it
        if messages and sum([len(m.payload) for m in messages]) <= _READ_AHEAD_BYTES:
            st.ahead = messages
            st.ahead_from = st.cursor

    def _deliver_plain(
        self,
        member: SharedMember,
        p: int,
        st: _PartitionState,
        messages: list[Message],
        room: int,
        out: list[Delivery],
        now: float,
    ) -> bool:
        """`_deliver_scanned` for the usual case: no keys to order, no nack delays in this
        partition, no byte limit (the same steps, without the checks they need)."""
        limit = self.config.max_ack_pending
        max_deliver = self.config.max_deliver
        deadline = now + self.config.ack_wait_s
        name = self.name
        done, counts, leased = st.done, st.counts, st.leased
        unfinished = self._unfinished
        lease = self._next_lease
        append = out.append
        taken = len(out)
        first = end = -1  # the current run of delivered offsets
        cursor = st.cursor
        stopped = False
        try:
            for message in messages:
                offset: int = message.offset  # type: ignore[assignment]
                if taken >= room or unfinished >= limit:
                    stopped = True
                    break
                cursor = offset + 1
                if (done and offset in done) or offset in leased:
                    continue
                count = counts.get(offset) if counts else None
                if count is None:
                    count = 1
                    unfinished += 1
                elif max_deliver is not None and count >= max_deliver:
                    self._exhausted.append(message)
                    continue
                else:
                    del counts[offset]
                    count += 1
                lease += 1
                delivery = Delivery(message, name, count, self, lease, None, member, deadline)
                leased[offset] = delivery
                append(delivery)
                taken += 1
                if offset == end:
                    end += 1
                else:
                    if end > first:
                        self._armed(deadline, p, first, end)
                    first, end = offset, offset + 1
        finally:
            if end > first:
                self._armed(deadline, p, first, end)
            member.pending += lease - self._next_lease
            self._next_lease = lease
            self._unfinished = unfinished
            st.cursor = cursor
        return stopped

    def _deliver_scanned(
        self,
        member: SharedMember,
        p: int,
        st: _PartitionState,
        messages: list[Message],
        room: int,
        out: list[Delivery],
        now: float,
    ) -> bool:
        """Deliver what can be of ``messages`` (read at the cursor, in offset order); True when a
        limit stopped it. The hot loop of fetching: each run of consecutive offsets delivered is
        one DELIVER event and one expiry entry."""
        config = self.config
        limit = config.max_ack_pending
        max_deliver = config.max_deliver
        key_ordered = config.key_ordered
        deadline = now + config.ack_wait_s
        name = self.name
        done, counts, not_before, leased = st.done, st.counts, st.not_before, st.leased
        bytes_left = self._bytes_left
        unfinished = self._unfinished
        lease = self._next_lease
        append = out.append
        taken = len(out)
        first = end = -1  # the current run of delivered offsets
        cursor = st.cursor
        stopped = False
        try:
            for message in messages:
                if (
                    taken >= room
                    or unfinished >= limit
                    or (bytes_left is not None and bytes_left <= 0 and taken)
                ):
                    stopped = True
                    break
                offset: int = message.offset  # type: ignore[assignment]
                cursor = offset + 1
                if (done and offset in done) or offset in leased:
                    continue
                if key_ordered and message.key is not None:
                    key = message.key
                    if key in self._key_owner or key in self._parked:
                        self._parked.setdefault(key, deque()).append(message)
                        self._parked_count += 1
                        continue
                if not_before:
                    wait_until = not_before.get(offset)
                    if wait_until is not None and wait_until > time.time_ns():
                        self._hold_key(message)
                        heapq.heappush(self._ready, (now + (wait_until - time.time_ns()) / 1e9, p, offset))
                        continue
                count = counts.get(offset)
                if count is None:
                    count = 1
                    unfinished += 1
                elif max_deliver is not None and count >= max_deliver:
                    self._hold_key(message)
                    self._exhausted.append(message)
                    continue
                else:
                    del counts[offset]
                    count += 1
                if key_ordered:
                    self._hold_key(message)
                lease += 1
                delivery = Delivery(message, name, count, self, lease, None, member, deadline)
                leased[offset] = delivery
                append(delivery)
                taken += 1
                if bytes_left is not None:
                    bytes_left -= len(message.payload)
                if offset == end:
                    end += 1
                else:
                    if end > first:
                        self._armed(deadline, p, first, end)
                    first, end = offset, offset + 1
        finally:
            if end > first:
                self._armed(deadline, p, first, end)
            member.pending += lease - self._next_lease
            self._next_lease = lease
            self._unfinished = unfinished
            self._bytes_left = bytes_left
            st.cursor = cursor
        return stopped

    def _armed(self, deadline: float, p: int, first: int, end: int) -> None:
        """Offsets first..end-1 of partition ``p`` were just leased until ``deadline``."""
        self._expiry.append((deadline, p, first, end))
        self._state.record(DELIVER, p, first, end - first)

    def _hold_key(self, message: Message) -> None:
        if self.config.key_ordered and message.key is not None:
            assert message.partition is not None and message.offset is not None
            self._key_owner[message.key] = (message.partition, message.offset)

    # -- settling --------------------------------------------------------------------------------

    def _check_held(self, delivery: Delivery, st: _PartitionState) -> None:
        """Raise unless ``delivery`` is the current lease of its message, unsettled."""
        current = st.leased.get(delivery.offset)
        if current is not delivery or delivery.settled or delivery.is_cancelled():
            self._check_settle(delivery, None if current is None else current.lease)
            raise AssertionError(f"{delivery!r} is not held")  # _check_settle raised already

    def _take_lease(self, delivery: Delivery) -> _PartitionState:
        """Settle ``delivery``: its message is no longer leased (but still unfinished)."""
        st = self._parts[delivery.partition]
        self._check_held(delivery, st)
        delivery.settled = True
        del st.leased[delivery.offset]
        st.counts[delivery.offset] = delivery.delivery_count
        delivery.holder.pending -= 1
        return st

    def _done(self, st: _PartitionState, p: int, offset: int, message: Message | None) -> None:
        """In memory: ``offset`` is finished (its event is the caller's to record)."""
        if st.finish(offset):
            self._unfinished -= 1
        if self._failures:
            self._failures.pop((p, offset), None)
        if (
            self._key_owner
            and message is not None
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
        if self._waiting:
            self._wake()

    def _finish(self, p: int, offset: int, message: Message | None, kind: int) -> None:
        self._done(self._parts[p], p, offset, message)
        self._state.record(kind, p, offset)

    async def _ack(self, delivery: Delivery) -> None:
        # The hottest path: _take_lease and _done inlined for the usual case.
        p = delivery.partition
        offset = delivery.offset
        st = self._parts[p]
        leased = st.leased
        # (a delivery settled, expired or taken back is never its message's lease)
        if leased.get(offset) is not delivery or delivery._cancelled is not None:
            self._check_held(delivery, st)  # raises, unless it only found an unset CancelSignal
        delivery.settled = True
        del leased[offset]
        delivery.holder.pending -= 1
        self._unfinished -= 1
        if self._failures or self._key_owner or st.not_before:
            self._done(st, p, offset, delivery.message)
        else:
            floor = st.floor
            if offset == floor:
                floor += 1
                done = st.done
                if done:
                    while floor in done:
                        done.remove(floor)
                        floor += 1
                st.floor = floor
            elif offset > floor:
                st.done.add(offset)
            if self._waiting:
                self._wake()
        state = self._state
        written = state.write(ACK, p, offset)  # in the OS when this returns
        if state.always:
            await state.wait_durable(written)
        if state.until_snapshot <= 0:
            await state.maybe_snapshot(self._snapshot_state)

    async def _ack_batch(self, deliveries: list[Delivery]) -> None:
        seen = set()
        for delivery in deliveries:  # all or nothing: check every one before settling any
            self._check_held(delivery, self._parts[delivery.partition])
            if id(delivery) in seen:
                raise AlreadySettledError(f"{delivery!r} appears twice in the batch")
            seen.add(id(delivery))
        for delivery in deliveries:
            st = self._take_lease(delivery)
            self._done(st, delivery.partition, delivery.offset, delivery.message)
            self._state.record(ACK, delivery.partition, delivery.offset)
        await self._flush()

    async def _ack_waiting(self, partition: int, below: int) -> None:
        st = self._parts[partition]
        waiting = [offset for offset in st.counts if offset < below]
        for offset in waiting:
            self._finish(partition, offset, None, ACK)
        if waiting:
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
        self._check_held(delivery, self._parts[delivery.partition])
        delivery.deadline = time.monotonic() + self.config.ack_wait_s
        self._expiry.append((delivery.deadline, delivery.partition, delivery.offset, delivery.offset + 1))

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

    def _revoke(self, st: _PartitionState, delivery: Delivery) -> None:
        """Take back a lease its holder did not settle (expired, or the member left)."""
        del st.leased[delivery.offset]
        st.counts[delivery.offset] = delivery.delivery_count
        delivery.holder.pending -= 1
        delivery.cancelled.set()

    async def _expire_leases(self) -> None:
        while not self._closed:
            now = time.monotonic()
            expired = []
            expiry = self._expiry
            while expiry and expiry[0][0] <= now:
                _, p, first, end = expiry.popleft()
                st = self._parts[p]
                leased = st.leased
                if not leased:
                    continue
                # Skip leases settled or re-leased meanwhile; an extended one is queued again.
                for offset in range(first, end):
                    delivery = leased.get(offset)
                    if delivery is not None and delivery.deadline <= now:
                        self._revoke(st, delivery)
                        expired.append(delivery)
            for delivery in expired:
                await self._failed(
                    delivery, f"not acknowledged within ack_wait ({self.config.ack_wait_s}s)", None
                )
            if expired:
                await self._flush()
            next_deadline = expiry[0][0] - now if expiry else _EXPIRY_TICK_S
            await asyncio.sleep(max(0.001, min(_EXPIRY_TICK_S, next_deadline)))

    async def _release_member(self, member: SharedMember) -> None:
        """A member left: its leased messages are redelivered at once (max_deliver still holds)."""
        member.left = True
        released = []
        for st in self._parts:
            for delivery in [d for d in st.leased.values() if d.holder is member]:
                self._revoke(st, delivery)
                released.append(delivery)
        for delivery in released:
            await self._failed(delivery, f"member {member.name!r} left", 0.0)
        member.pending = 0
        self._members.pop(member.name, None)
        await self._flush()
        self._wake()

    # -- observing ---------------------------------------------------------------------------------

    def lag(self) -> list[PartitionLag]:
        out = []
        for p, st in enumerate(self._parts):
            head = self.stream.partitions[p].next_offset
            committed = min(st.floor, head)
            unfinished = max(0, head - committed - len(st.done))
            in_flight = len(st.leased)
            waiting = len(st.counts)
            out.append(
                PartitionLag(
                    partition=p,
                    head=head,
                    committed=committed,
                    lag=head - committed,
                    pending=max(0, unfinished - in_flight - waiting),
                    in_flight=in_flight,
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

    async def ack_waiting(self, below: int, partition: int = 0) -> None:
        """Acknowledge the messages of ``partition`` below offset ``below`` that are delivered
        but not leased now (nacked, expired, or in flight at a restart): what an ack covering
        everything before it settles (JetStream's AckAll). The group's keys are not released
        by it: not for key-ordered groups."""
        await self.group._ack_waiting(partition, below)

    async def leave(self) -> None:
        await self.group._release_member(self)

