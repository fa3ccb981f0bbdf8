"""Ordered groups: one member per partition, each partition read in order, one batch at a time.

Redis has no such thing, so pigeon coordinates it (see `._lua.SYNC_ORDERED`): members keep a
session in a sorted set, each partition has a lock (``SET NX PX session``) renewed by the
holder's heartbeats, and every member derives the same assignment from the sorted list of
live members. A member hands a partition over once its outstanding batch is settled (or
after ``ack_wait_s`` if it never is); a member that stops heartbeating loses its locks when
they expire, and the next owner re-reads what it left pending, in order.

Acks are local until the batch is settled from its start; then the settled prefix is
committed with XACK, under the partition lock (a member that lost the partition cannot
commit). A nack commits the settled prefix, counts the failure on the nacked entry and pauses
the partition for the delay; the next batch re-reads the pending entries from the first
unsettled one, so order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ...engine.groups.base import check_fetch
from ...errors import DeliveryNotOwnedError, GroupNotFoundError
from ._codec import entry_message, failure_args
from ._groups import RELEASED, Delivery, GroupContext, RedisMember

log = logging.getLogger("pigeon.transport.redis")


class _Batch:
    __slots__ = ("cancelled", "deliveries", "partition")

    def __init__(self, partition: int, deliveries: list[Delivery]) -> None:
        self.partition = partition
        self.deliveries = deliveries
        self.cancelled = False

    def settled_prefix(self) -> list[Delivery]:
        prefix = []
        for delivery in self.deliveries:
            if not delivery.settled:
                break
            prefix.append(delivery)
        return prefix


class OrderedMember(RedisMember):
    def __init__(self, ctx: GroupContext, name: str) -> None:
        super().__init__(ctx, name)
        group = ctx.spec.group
        # The token names this incarnation of the member: its locks, its session and its
        # Redis consumer. A restarted member is a new one and re-reads what the old one left.
        self.token = f"{name}/{uuid.uuid4().hex[:8]}"
        self.members_key = ctx.keys.members(ctx.stream, group)
        self.lock_keys = [ctx.keys.lock(ctx.stream, group, p) for p in range(ctx.partitions)]
        self.pause_keys = [ctx.keys.pause(ctx.stream, group, p) for p in range(ctx.partitions)]
        self.owned: set[int] = set()
        self.paused: set[int] = set()  # owned, but a delayed nack holds them back
        self.batches: dict[int, _Batch] = {}
        self.handover_since: dict[int, float] = {}  # partition -> when we were asked to hand it over
        self._settled = asyncio.Event()
        self._heartbeats: asyncio.Task[None] | None = None
        # One sync at a time: the heartbeat's view of the locks must not overwrite a newer one.
        self._syncing = asyncio.Lock()
        self._session_ms = int(ctx.options.session_timeout_s * 1000)

    def _consumer_name(self) -> str:
        return self.token

    async def join(self) -> None:
        """Register the session; partitions are taken at the first fetch (joins settle first)."""
        await self._sync(room=0, acquire=False)
        self._heartbeats = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.ctx.options.heartbeat_interval_s)
            if self.closed:
                return
            try:
                await self._sync(room=0, acquire=False)
            except GroupNotFoundError:
                return
            except Exception as error:  # keep beating: the next one may get through
                log.warning(
                    "ordered group %s: heartbeat of %s failed: %s", self.ctx.spec.group, self.name, error
                )

    async def _sync(self, room: int, acquire: bool) -> tuple[list[Delivery], int]:
        """Refresh the session and locks, read batches (room > 0); returns them and the pause wait."""
        async with self._syncing:
            return await self._sync_now(room, acquire)

    async def _sync_now(self, room: int, acquire: bool) -> tuple[list[Delivery], int]:
        keys = [self.members_key, self.ctx.keys.groups(self.ctx.stream)]
        for p in range(self.ctx.partitions):
            keys += [self.lock_keys[p], self.pause_keys[p], self.stream_keys[p]]
        args: list[Any] = [self.ctx.spec.group, self.token, self._session_ms, room, "1" if acquire else "0"]
        args += [self._next_rotation(), RELEASED]
        args += ["1" if p in self.batches else "0" for p in range(self.ctx.partitions)]
        states, raw, wait = await self._run("sync_ordered", keys, args)
        for p, state in enumerate(states):
            await self._apply_state(p, int(state))
        out: list[Delivery] = []
        by_partition: dict[int, list[Delivery]] = {}
        for delivery, _ in self._deliveries(raw):
            by_partition.setdefault(delivery.partition, []).append(delivery)
        for p, deliveries in by_partition.items():
            out += await self._start_batch(p, deliveries)
        return out, int(wait)

    async def _apply_state(self, p: int, state: int) -> None:
        if state == 0:
            if p in self.owned:  # the lock expired and moved on: our batch is void
                self.owned.discard(p)
                self.paused.discard(p)
                self.handover_since.pop(p, None)
                self._drop_batch(p)
            return
        self.owned.add(p)
        if state == 3:
            self.paused.add(p)
        else:
            self.paused.discard(p)
        if state in (1, 3):
            self.handover_since.pop(p, None)
            return
        # Someone else's share now: hand it over once the batch is settled, or after ack_wait.
        since = self.handover_since.setdefault(p, time.monotonic())
        batch = self.batches.get(p)
        if batch is None or time.monotonic() - since >= self.ctx.spec.ack_wait_s:
            await self._release(p)

    async def _release(self, p: int) -> None:
        batch = self.batches.get(p)
        if batch is not None:
            # Lost the lock already? Then the next owner re-reads the batch: nothing to commit.
            with contextlib.suppress(DeliveryNotOwnedError):
                await self._commit(batch, batch.settled_prefix(), final=False)
        self._drop_batch(p)
        self.owned.discard(p)
        self.paused.discard(p)
        self.handover_since.pop(p, None)
        keys = [self.lock_keys[p], self.stream_keys[p]]
        await self._run("release_ordered", keys, [self.ctx.spec.group, self.token, RELEASED])

    def _drop_batch(self, p: int) -> None:
        batch = self.batches.pop(p, None)
        if batch is not None:
            batch.cancelled = True
            self._settled.set()

    async def _start_batch(self, p: int, deliveries: list[Delivery]) -> list[Delivery]:
        max_deliver = self.ctx.spec.max_deliver
        # Only the first entry's count can have grown past max_deliver (a member failed on it).
        while deliveries and max_deliver is not None and deliveries[0].delivery_count > max_deliver:
            first = deliveries.pop(0)
            if not await self._give_up_now(first, "the member processing it failed"):
                return []
        if not deliveries:
            return []
        batch = _Batch(p, deliveries)
        for delivery in deliveries:
            delivery.batch = batch
        self.batches[p] = batch
        return deliveries

    async def _give_up_now(self, delivery: Delivery, reason: str) -> bool:
        """Dead-letter and commit a message before delivering it; False if the lock was lost."""
        record = await self._note(delivery, reason, delivery.delivery_count - 1)
        if record is None:
            return False
        await self._give_up(delivery, delivery.delivery_count - 1, record)
        keys = [self.lock_keys[delivery.partition], self.stream_keys[delivery.partition], self.failures_key]
        args = [self.ctx.spec.group, self.token, delivery.partition, delivery.entry_id]
        return bool(await self._run("commit_ordered", keys, args))

    async def _note(self, delivery: Delivery, error: BaseException | str | None, count: int) -> Any:
        keys = [self.lock_keys[delivery.partition], self.failures_key]
        field = f"{delivery.partition}|{delivery.entry_id.decode()}"
        args = [self.token, field, repr(time.time()), *failure_args(error), count]
        return await self._run("note_ordered", keys, args)

    # -- fetching -----------------------------------------------------------------------------

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Delivery]:
        check_fetch(max_messages, timeout)
        self._check_open()
        deadline = time.monotonic() + timeout
        async with self._fetching:
            while not self.closed:
                self._settled.clear()
                out, pause_ms = await self._sync(room=max_messages, acquire=True)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = min(remaining, self.ctx.options.claim_interval_s)
                if pause_ms >= 0:
                    wait = min(wait, pause_ms / 1000)
                idle = [
                    p
                    for p in sorted(self.owned)
                    if p not in self.batches and p not in self.paused and p not in self.handover_since
                ]
                if idle:
                    # Every idle partition had nothing pending and nothing new (the sync read
                    # them all, since it found nothing): only new entries can come.
                    keys = [self.stream_keys[p] for p in idle]
                    reply = await self._wait_for_new(keys, max_messages, int(wait * 1000))
                    got = await self._from_blocking_read(reply)
                    if self.closed:
                        return []  # closing hands their partition over
                    if got:
                        return got
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._settled.wait(), wait)
            return []

    async def _from_blocking_read(self, reply: list[Any]) -> list[Delivery]:
        out: list[Delivery] = []
        for key, entries in reply:
            p = self.stream_keys.index(key.decode() if isinstance(key, bytes) else key)
            deliveries = [
                Delivery(self, entry_message(self.ctx.stream, p, entry_id, fields), entry_id, 1)
                for entry_id, fields in entries
            ]
            if p in self.batches or p not in self.owned:
                # Cannot happen while we hold the lock; if it does, a later owner re-reads them.
                continue
            out += await self._start_batch(p, deliveries)
        return out

    # -- settling -----------------------------------------------------------------------------

    def _batch_of(self, delivery: Delivery) -> _Batch:
        batch = delivery.batch
        assert isinstance(batch, _Batch)
        if batch.cancelled or self.batches.get(batch.partition) is not batch:
            raise DeliveryNotOwnedError(
                f"{delivery!r} is no longer held by member {self.name!r} (its partition moved to "
                "another member, or a nack rewound it)"
            )
        return batch

    async def _commit(self, batch: _Batch, deliveries: list[Delivery], *, final: bool) -> None:
        if deliveries:
            p = batch.partition
            keys = [self.lock_keys[p], self.stream_keys[p], self.failures_key]
            args = [self.ctx.spec.group, self.token, p, *(d.entry_id for d in deliveries)]
            if not await self._run("commit_ordered", keys, args):
                self._drop_batch(p)
                self.owned.discard(p)
                raise DeliveryNotOwnedError(
                    f"member {self.name!r} lost partition {p} of {self.ctx.stream!r} before committing"
                )
        if final:
            self.batches.pop(batch.partition, None)
            self._settled.set()

    async def _settled_ok(self, delivery: Delivery, batch: _Batch) -> None:
        """A delivery is done (acked, or given up): commit the batch once all of it is."""
        if all(d.settled for d in batch.deliveries):
            await self._commit(batch, batch.deliveries, final=True)

    async def _ack(self, delivery: Delivery) -> None:
        await self._settled_ok(delivery, self._batch_of(delivery))

    async def _nack(self, delivery: Delivery, delay: float | None, error: BaseException | str | None) -> None:
        batch = self._batch_of(delivery)
        spec = self.ctx.spec
        if spec.max_deliver is not None and delivery.delivery_count >= spec.max_deliver:
            await self._term_in_batch(delivery, batch, error)
            return
        if delay is None:
            delay = spec.backoff.delay(delivery.delivery_count) if spec.backoff else 0.0
        p = batch.partition
        # The settled prefix before the nacked message is done; it and everything after it
        # (even if acked) are delivered again, in order.
        prefix = [d for d in batch.settled_prefix() if d.offset < delivery.offset]
        keys = [self.lock_keys[p], self.stream_keys[p], self.failures_key, self.pause_keys[p]]
        args: list[Any] = [spec.group, self.token, p, delivery.entry_id, delivery.delivery_count + 1]
        args += [int(delay * 1000), repr(time.time()), *failure_args(error), *(d.entry_id for d in prefix)]
        # Rewind first, then drop the batch (which wakes the fetcher): a fetch in between
        # would read the partition from before the rewind.
        batch.cancelled = True  # nothing settles from it any more
        try:
            rewound = await self._run("rewind_ordered", keys, args)
        finally:
            self._drop_batch(p)
        if not rewound:
            self.owned.discard(p)
            raise DeliveryNotOwnedError(f"member {self.name!r} lost partition {p} of {self.ctx.stream!r}")

    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None:
        await self._term_in_batch(delivery, self._batch_of(delivery), reason or "terminated")

    async def _term_in_batch(
        self, delivery: Delivery, batch: _Batch, error: BaseException | str | None
    ) -> None:
        record = await self._note(delivery, error, delivery.delivery_count)
        if record is None:
            self._drop_batch(batch.partition)
            raise DeliveryNotOwnedError(
                f"member {self.name!r} lost partition {batch.partition} of {self.ctx.stream!r}"
            )
        await self._give_up(delivery, delivery.delivery_count, record)
        await self._settled_ok(delivery, batch)

    async def _in_progress(self, delivery: Delivery) -> None:
        self._batch_of(delivery)  # only checks: the heartbeats keep the partition

    async def _leave(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeats
        with contextlib.suppress(GroupNotFoundError):
            for p in sorted(self.owned):
                with contextlib.suppress(DeliveryNotOwnedError):
                    await self._release(p)
        await self._run("leave_ordered", [self.members_key], [self.token])
