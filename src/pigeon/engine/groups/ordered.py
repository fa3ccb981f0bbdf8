"""Ordered groups: Kafka's model. Members split the partitions; each partition is read in order.

A partition has at most one outstanding batch: the next batch is delivered once every
message of the current one is acknowledged, and a nack rewinds the partition to the nacked
message. That keeps per-partition order exact even across failures. Acknowledged progress
becomes durable (a commit of the next offset to read) per message, per batch, or
periodically; it is never committed before the message is acknowledged.

Membership is cooperative-sticky: when members join, leave or time out, only the partitions
that must move are revoked, and members keep the rest without pausing. A revoked partition's
deliveries are cancelled (their ``cancelled`` event is set) and can no longer be settled.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ...errors import AlreadySettledError, GroupHasMembersError, InvalidConfigError, MemberNotFoundError
from ..config import StartAt
from ..stream import Stream
from .base import DeadLetterSink, GroupBase, check_fetch, check_nack_delay
from .config import OrderedGroupConfig
from .deadletter import Failures
from .delivery import CancelSignal, Delivery
from .lag import PartitionLag
from .statelog import COMMIT, DELIVER, StateLog

log = logging.getLogger("pigeon.engine")

PartitionsCallback = Callable[[list[int]], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class MemberState:
    name: str
    partitions: tuple[int, ...]
    idle: bool


class _PartitionState:
    __slots__ = (
        "batch",
        "committed",
        "delivered_upto",
        "epoch",
        "owner",
        "paused_until",
        "position",
        "processed",
        "redelivered",
        "settled_prefix",
    )

    def __init__(self, committed: int) -> None:
        self.committed = committed  # durable: the next offset to read after a restart
        self.position = committed  # next offset to deliver
        self.processed = committed  # every offset below it is acknowledged
        self.batch: list[Delivery] = []  # the outstanding batch
        self.settled_prefix = 0  # how many of the batch, from its start, are settled
        self.owner: OrderedMember | None = None
        self.epoch = 0  # bumped on every change of owner: fences stale settlements
        self.paused_until = 0.0
        # Delivery counts: everything below delivered_upto was delivered at least once;
        # redelivered holds the count of each offset delivered more than once (uncommitted).
        self.delivered_upto = committed
        self.redelivered: dict[int, int] = {}

    def note_delivered(self, start: int, end: int) -> None:
        """Offsets start..end-1 were (re)delivered: count them (also used when replaying the log)."""
        for offset in range(start, min(end, self.delivered_upto)):
            self.redelivered[offset] = self.redelivered.get(offset, 1) + 1
        self.delivered_upto = max(self.delivered_upto, end)

    def forget_below(self, offset: int) -> None:
        if self.redelivered:
            self.redelivered = {o: c for o, c in self.redelivered.items() if o >= offset}


class OrderedGroup(GroupBase):
    def __init__(
        self,
        stream: Stream,
        config: OrderedGroupConfig,
        state: StateLog,
        dead_letters: DeadLetterSink | None,
        dead_letter_subject: str,
        start_offsets: list[int],
    ) -> None:
        super().__init__(stream, config, state, dead_letters, dead_letter_subject)
        self.config = config
        self._parts = [_PartitionState(offset) for offset in start_offsets]
        self._members: dict[str, OrderedMember] = {}
        self._joined = 0
        self._coordinator: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None

    # -- durable state -----------------------------------------------------------------------------

    def restore(self, snapshot: dict[str, Any] | None, events: list[tuple[int, int, int, int]]) -> None:
        if snapshot is not None:
            for st, saved in zip(self._parts, snapshot["partitions"], strict=True):
                st.committed = saved["committed"]
                st.delivered_upto = saved["delivered_upto"]
                st.redelivered = {int(o): c for o, c in saved["redelivered"].items()}
        for kind, p, offset, value in events:
            st = self._parts[p]
            if kind == COMMIT:
                st.committed = offset
                st.delivered_upto = max(st.delivered_upto, offset)
            elif kind == DELIVER:
                st.note_delivered(offset, offset + value)
        for st in self._parts:
            st.position = st.processed = st.committed
            st.forget_below(st.committed)

    def _snapshot_state(self) -> dict[str, Any]:
        return {
            "partitions": [
                {
                    "committed": st.committed,
                    "delivered_upto": st.delivered_upto,
                    "redelivered": st.redelivered,
                }
                for st in self._parts
            ]
        }

    async def _commit(self, partitions: list[int]) -> None:
        """Make the acknowledged progress of ``partitions`` durable."""
        changed = False
        for p in partitions:
            st = self._parts[p]
            if st.processed != st.committed:
                st.committed = st.processed
                self._state.record(COMMIT, p, st.committed)
                changed = True
        if changed:
            await self._state.flush()
            await self._state.maybe_snapshot(self._snapshot_state)

    async def reset_offsets(self, start: StartAt) -> None:
        """Move every partition's committed offset (only while the group has no members)."""
        self._check_open()
        if self._members:
            raise GroupHasMembersError(
                f"group {self.name!r} has members {sorted(self._members)}: offsets can only be "
                "reset while it has none"
            )
        for p, st in enumerate(self._parts):
            st.committed = st.position = st.processed = self.stream.partitions[p].resolve(start)
            st.delivered_upto = st.committed
            st.redelivered = {}
            self._state.record(COMMIT, p, st.committed)
        await self._state.flush()

    # -- membership -----------------------------------------------------------------------------------

    async def join(
        self,
        name: str | None = None,
        *,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        auto_heartbeat: bool = True,
    ) -> OrderedMember:
        """Join the group; partitions are rebalanced at once (cooperatively)."""
        self._check_open()
        self._joined += 1
        name = name or f"member-{self._joined}"
        if name in self._members:
            raise InvalidConfigError(f"group {self.name!r} already has a member named {name!r}")
        member = OrderedMember(self, name, self._joined, on_assigned, on_revoked)
        self._members[name] = member
        if auto_heartbeat:
            member._heartbeats = asyncio.get_running_loop().create_task(member._beat())
        if self._coordinator is None:
            self._coordinator = asyncio.get_running_loop().create_task(self._watch_members())
        if self.config.commit == "periodic" and self._periodic is None:
            self._periodic = asyncio.get_running_loop().create_task(self._commit_periodically())
        await self._rebalance()
        return member

    async def _remove(self, member: OrderedMember, why: str) -> None:
        if self._members.get(member.name) is not member:
            return
        log.info("group %s on %s: member %s leaves (%s)", self.name, self.stream.name, member.name, why)
        del self._members[member.name]
        member.removed = why
        if member._heartbeats is not None:
            member._heartbeats.cancel()
        await self._rebalance()

    async def _rebalance(self) -> None:
        """Cooperative-sticky: revoke only what must move, then hand it to members below quota."""
        members = sorted(self._members.values(), key=lambda m: m.joined)
        count = len(self._parts)
        quotas = {m: count // len(members) + (i < count % len(members)) for i, m in enumerate(members)}
        revoked: dict[OrderedMember, list[int]] = {}
        free = [p for p, st in enumerate(self._parts) if st.owner is None or st.owner not in quotas]
        for p in free:
            owner = self._parts[p].owner
            if owner is not None:
                revoked.setdefault(owner, []).append(p)
        for member in members:
            owned = sorted(member.partitions)
            while len(owned) > quotas[member]:
                p = owned.pop()
                revoked.setdefault(member, []).append(p)
                free.append(p)
        for member, partitions in revoked.items():
            for p in partitions:
                self._release(p)
            await _call(member.on_revoked, sorted(partitions), f"{member.name} on_revoked")
        await self._commit([p for ps in revoked.values() for p in ps])
        free.sort()
        assigned: dict[OrderedMember, list[int]] = {}
        for member in members:
            while len(member.partitions) < quotas[member] and free:
                p = free.pop(0)
                st = self._parts[p]
                st.owner = member
                st.epoch += 1
                member.partitions.add(p)
                assigned.setdefault(member, []).append(p)
        for member, partitions in assigned.items():
            await _call(member.on_assigned, partitions, f"{member.name} on_assigned")
        self._wake()

    def _release(self, p: int) -> None:
        st = self._parts[p]
        if st.owner is not None:
            st.owner.partitions.discard(p)
        st.owner = None
        st.epoch += 1
        for delivery in st.batch:
            delivery.cancelled.set()
        st.batch = []
        st.settled_prefix = 0
        st.position = st.processed
        st.paused_until = 0.0

    async def _watch_members(self) -> None:
        config = self.config
        tick = min(config.heartbeat_interval_s, config.session_timeout_s / 4, 1.0)
        while not self._closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for member in list(self._members.values()):
                if now - member.last_heartbeat > config.session_timeout_s:
                    await self._remove(member, f"no heartbeat for {config.session_timeout_s}s")
                elif not member.fetching and now - member.last_poll > config.max_poll_interval_s:
                    await self._remove(member, f"no poll for {config.max_poll_interval_s}s")

    async def _commit_periodically(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.commit_interval_s)
            await self._commit(list(range(len(self._parts))))

    # -- fetching ----------------------------------------------------------------------------------

    async def _fetch(
        self, member: OrderedMember, max_messages: int, timeout: float, max_bytes: int | None
    ) -> list[Delivery]:
        check_fetch(max_messages, timeout, max_bytes)
        deadline = time.monotonic() + timeout
        member.fetching = True  # a member waiting inside fetch is polling
        try:
            while True:
                self._check_member(member)
                member.last_poll = time.monotonic()
                out = self._collect(member, max_messages, max_bytes)
                if out:
                    await self._state.flush()  # the deliveries, for counts that survive a crash
                    return out
                # Only pauses still ahead: waiting for one already past would not yield, and the
                # loop would spin with the event loop blocked until the fetch times out.
                now = time.monotonic()
                paused = [until for p in member.partitions if (until := self._parts[p].paused_until) > now]
                wake_at = min([deadline, *paused])
                if not await self._wait(wake_at) and time.monotonic() >= deadline:
                    self._check_member(member)
                    return []
        finally:
            member.fetching = False
            member.last_poll = time.monotonic()

    def _check_member(self, member: OrderedMember) -> None:
        self._check_open()
        if member.removed:
            raise MemberNotFoundError(
                f"member {member.name!r} is no longer in group {self.name!r}: {member.removed}"
            )

    def _collect(self, member: OrderedMember, max_messages: int, max_bytes: int | None) -> list[Delivery]:
        out: list[Delivery] = []
        now = time.monotonic()
        partitions = sorted(member.partitions)
        if not partitions:
            return out
        member.rotation = (member.rotation + 1) % len(partitions)
        for p in partitions[member.rotation :] + partitions[: member.rotation]:
            st = self._parts[p]
            if st.batch or st.paused_until > now or len(out) >= max_messages:
                continue
            if max_bytes is not None and out and max_bytes <= 0:
                break
            messages = self.stream.partitions[p].fetch(st.position, max_messages - len(out), max_bytes)
            if not messages:
                continue
            cancelled = CancelSignal()
            epoch = st.epoch
            name = self.name
            first: int = messages[0].offset  # type: ignore[assignment]
            end: int = messages[-1].offset + 1  # type: ignore[operator]
            if first >= st.delivered_upto:  # the usual case: all new, delivered once
                st.batch = [Delivery(m, name, 1, self, epoch, cancelled) for m in messages]
            else:
                st.batch = [
                    Delivery(m, name, self._count_for(st, m.offset), self, epoch, cancelled)  # type: ignore[arg-type]
                    for m in messages
                ]
            st.note_delivered(first, end)
            self._state.record(DELIVER, p, first, end - first)
            out += st.batch
            if max_bytes is not None:
                max_bytes -= sum(len(m.payload) for m in messages)
            if first > st.processed:  # retention removed what lay between
                st.processed = first
            st.position = end
        return out

    @staticmethod
    def _count_for(st: _PartitionState, offset: int) -> int:
        return st.redelivered.get(offset, 1) + 1 if offset < st.delivered_upto else 1

    # -- settling ----------------------------------------------------------------------------------

    def _settle(self, delivery: Delivery) -> _PartitionState:
        st = self._parts[delivery.partition]
        # Deliveries of one batch share its cancellation event: identity tells the batch.
        current = st.epoch if st.batch and delivery.cancelled is st.batch[0].cancelled else None
        self._check_settle(delivery, current)
        delivery.settled = True
        return st

    def _advance(self, st: _PartitionState) -> bool:
        """Move ``processed`` over the settled prefix of the batch; True when it is all settled."""
        batch = st.batch
        i = st.settled_prefix
        while i < len(batch) and batch[i].settled:
            i += 1
        st.settled_prefix = i
        if i < len(batch):
            st.processed = batch[i].offset
            return False
        if batch:
            st.processed = batch[-1].offset + 1
            st.forget_below(st.processed)
            st.batch = []
            st.settled_prefix = 0
        return True

    async def _ack(self, delivery: Delivery) -> None:
        await self._acknowledged(delivery, self._settle(delivery))

    async def _ack_batch(self, deliveries: list[Delivery]) -> None:
        touched: dict[int, _PartitionState] = {}
        for delivery in deliveries:  # all or nothing: check every one before settling any
            st = self._parts[delivery.partition]
            # The checks of _settle, inlined: this loop runs once per message.
            signal = delivery._cancelled
            if (
                delivery.settled
                or signal is None
                or signal._set
                or delivery.lease != st.epoch
                or not st.batch
                or signal is not st.batch[0]._cancelled
            ):
                self._check_settle(
                    delivery, st.epoch if st.batch and signal is st.batch[0]._cancelled else None
                )
            touched[delivery.partition] = st
        if len({id(d) for d in deliveries}) != len(deliveries):
            raise AlreadySettledError("a delivery appears twice in the batch")
        for delivery in deliveries:
            delivery.settled = True
        if self._failures:
            for delivery in deliveries:
                self._failures.pop((delivery.partition, delivery.offset), None)
        done = [p for p, st in touched.items() if self._advance(st)]
        mode = self.config.commit
        await self._commit(list(touched) if mode == "message" else done if mode == "batch" else [])
        if done:
            self._wake()

    async def _acknowledged(self, delivery: Delivery, st: _PartitionState) -> None:
        self._failures.pop((delivery.partition, delivery.offset), None)
        done = self._advance(st)
        mode = self.config.commit
        if mode == "message" or (mode == "batch" and done):
            await self._commit([delivery.partition])
        if done:
            self._wake()

    async def _nack(self, delivery: Delivery, delay: float | None, error: BaseException | str | None) -> None:
        check_nack_delay(delay)
        st = self._settle(delivery)
        failures = self._note_failure(delivery, error)
        max_deliver = self.config.max_deliver
        if max_deliver is not None and delivery.delivery_count >= max_deliver:
            await self._give_up(delivery, st, failures)
            return
        if delay is None:
            delay = self.config.backoff.delay(delivery.delivery_count) if self.config.backoff else 0.0
        # Rewind to the first unsettled message (normally the failed one): it and everything
        # after it are delivered again, in order.
        st.batch = [d for d in st.batch if d.offset < delivery.offset]
        st.settled_prefix = min(st.settled_prefix, len(st.batch))
        self._advance(st)
        st.processed = min(st.processed, delivery.offset)
        delivery.cancelled.set()
        st.batch = []
        st.settled_prefix = 0
        st.position = st.processed
        st.paused_until = time.monotonic() + delay if delay else 0.0
        if self.config.commit != "periodic":
            await self._commit([delivery.partition])
        self._wake()

    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None:
        st = self._settle(delivery)
        await self._give_up(delivery, st, self._note_failure(delivery, reason or "terminated"))

    async def _give_up(self, delivery: Delivery, st: _PartitionState, failures: Failures) -> None:
        """Dead-letter the message (when enabled) and move past it as if acknowledged."""
        if self.config.dead_letter:
            await self._send_to_dead_letters(delivery, failures)
        await self._acknowledged(delivery, st)

    async def _in_progress(self, delivery: Delivery) -> None:
        st = self._parts[delivery.partition]
        self._check_settle(
            delivery, st.epoch if st.batch and delivery.cancelled is st.batch[0].cancelled else None
        )
        if st.owner is not None:
            st.owner.last_poll = time.monotonic()

    async def _commit_member(self, member: OrderedMember) -> None:
        self._check_member(member)
        await self._commit(sorted(member.partitions))

    # -- observing ------------------------------------------------------------------------------------

    def lag(self) -> list[PartitionLag]:
        out = []
        for p, st in enumerate(self._parts):
            head = self.stream.partitions[p].next_offset
            committed = min(st.committed, head)
            in_flight = sum(not d.settled for d in st.batch)
            out.append(
                PartitionLag(
                    partition=p,
                    head=head,
                    committed=committed,
                    lag=head - committed,
                    pending=max(0, head - st.position),
                    in_flight=in_flight,
                    waiting=0,
                    owner=None if st.owner is None else st.owner.name,
                )
            )
        return out

    def members(self) -> list[MemberState]:
        """Every member with its partitions; members beyond the partition count are idle."""
        return [
            MemberState(m.name, tuple(sorted(m.partitions)), not m.partitions)
            for m in sorted(self._members.values(), key=lambda m: m.joined)
        ]

    async def close(self) -> None:
        for task in (self._coordinator, self._periodic):
            if task is not None:
                task.cancel()
        for member in list(self._members.values()):
            if member._heartbeats is not None:
                member._heartbeats.cancel()
        await self._commit(list(range(len(self._parts))))
        await super().close()


class OrderedMember:
    """One member of an ordered group: it reads the partitions assigned to it, in order."""

    def __init__(
        self,
        group: OrderedGroup,
        name: str,
        joined: int,
        on_assigned: PartitionsCallback | None,
        on_revoked: PartitionsCallback | None,
    ) -> None:
        self.group = group
        self.name = name
        self.joined = joined
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.partitions: set[int] = set()
        self.rotation = 0
        self.removed = ""
        self.fetching = False
        self.last_heartbeat = self.last_poll = time.monotonic()
        self._heartbeats: asyncio.Task[None] | None = None

    async def fetch(
        self, max_messages: int = 100, timeout: float = 5.0, *, max_bytes: int | None = None
    ) -> list[Delivery]:
        """Long-poll the assigned partitions: in order, one outstanding batch per partition
        (and about ``max_bytes`` of payload, at least one message)."""
        return await self.group._fetch(self, max_messages, timeout, max_bytes)

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while True:
            for delivery in await self.fetch(100, 5.0):
                yield delivery

    async def ack_batch(self, deliveries: list[Delivery]) -> None:
        """Acknowledge many deliveries at once: one commit instead of one per message."""
        await self.group._ack_batch(deliveries)

    def heartbeat(self) -> None:
        self.group._check_member(self)
        self.last_heartbeat = time.monotonic()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.group.config.heartbeat_interval_s)
            if self.removed:
                return
            self.last_heartbeat = time.monotonic()

    async def commit(self) -> None:
        """Commit the acknowledged progress of this member's partitions now."""
        await self.group._commit_member(self)

    async def leave(self) -> None:
        """Commit what was acknowledged and leave; the partitions move to the other members."""
        await self.group._remove(self, "left")


async def _call(callback: PartitionsCallback | None, partitions: list[int], what: str) -> None:
    if callback is None or not partitions:
        return
    try:
        result = callback(partitions)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("%s raised; the rebalance goes on", what)
