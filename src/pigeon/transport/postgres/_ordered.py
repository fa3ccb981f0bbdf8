"""Ordered groups: one member per partition, in offset order, one outstanding batch per partition.

Members register in ``members`` (a join counter orders them) and heartbeat every
``heartbeat_interval_s``. Every member derives the same assignment from the list of live
members in join order: member i of n gets the partitions p with p % n == i, so members beyond
the partition count are idle. ``group_partitions`` holds, per partition, the committed offset
(the next one to read), its owner and the owner's heartbeat expiry: a member takes a
partition of its share when it is free, already its own, or its owner's heartbeat expired;
it hands over a partition that is no longer its share once the outstanding batch is settled
(or ``ack_wait_s`` after noticing, cancelling the batch).

Reading is ``offset >= committed`` in order: the write path makes offsets commit in order
within a partition, so no message that commits late is ever skipped. The next batch of a
partition comes only once the current one is fully settled. Each ack commits the settled
prefix of the batch (``committed = GREATEST(committed, n)``, only while still the owner:
otherwise `DeliveryNotOwnedError`), never before the ack. A nack rewinds the partition to the
first unsettled message and pauses it for the delay (``paused_until``, in the table, so a new
owner waits too). Delivery counts are durable (``delivered_upto`` and the counts of messages
delivered more than once), so ``max_deliver`` holds across members and crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Sequence

import asyncpg  # type: ignore[import-untyped]

from ...engine.groups.base import check_fetch, check_nack_delay
from ...engine.groups.deadletter import Failures
from ...errors import DeliveryNotOwnedError, GroupNotFoundError, MemberNotFoundError, TransportClosedError
from ..base import ConsumerSpec, Received
from ._groups import GroupConsumer, GroupContext, PgReceived, failures_from, note
from ._streams import read

log = logging.getLogger("pigeon.transport.postgres")


class _Part:
    """An owned partition, as this member knows it."""

    __slots__ = (
        "batch",
        "committed",
        "delivered_upto",
        "epoch",
        "redelivered",
        "revoked_at",
        "settled_prefix",
    )

    def __init__(self, epoch: int, committed: int, delivered_upto: int, redelivered: dict[int, int]) -> None:
        self.epoch = epoch  # fences deliveries of an earlier ownership or a cancelled batch
        self.committed = committed
        self.delivered_upto = delivered_upto
        self.redelivered = redelivered
        self.batch: list[PgReceived] = []
        self.settled_prefix = 0
        self.revoked_at: float | None = None

    def count_for(self, offset: int) -> int:
        return self.redelivered.get(offset, 1) + 1 if offset < self.delivered_upto else 1

    def note_delivered(self, start: int, end: int) -> None:
        for offset in range(start, min(end, self.delivered_upto)):
            self.redelivered[offset] = self.redelivered.get(offset, 1) + 1
        self.delivered_upto = max(self.delivered_upto, end)
        self.redelivered = {o: c for o, c in self.redelivered.items() if o >= self.committed}

    def advance(self) -> tuple[int, bool]:
        """(offset below which everything is settled, whether the whole batch is)."""
        batch = self.batch
        i = self.settled_prefix
        while i < len(batch) and batch[i].settled:
            i += 1
        self.settled_prefix = i
        if i < len(batch):
            return batch[i].offset, False
        return batch[-1].offset + 1, True


class OrderedConsumer(GroupConsumer):
    def __init__(
        self, ctx: GroupContext, stream: str, spec: ConsumerSpec, name: str, partitions: int
    ) -> None:
        super().__init__(ctx, stream, spec, name, partitions)
        self.member_id = f"{name}#{secrets.token_hex(4)}"
        self._owned: dict[int, _Part] = {}
        self._target: set[int] = set()
        self._epochs = itertools.count(1)
        self._rotation = 0
        self._heartbeats: asyncio.Task[None] | None = None
        self._commits: dict[int, list[tuple[int, bool, PgReceived, asyncio.Future[None]]]] = {}
        self._committer: asyncio.Task[None] | None = None
        self._group = (stream, spec.group)

    async def join(self) -> None:
        n = self.ctx.names
        async with self.ctx.group_pool.acquire() as conn:
            await conn.execute(
                f"""WITH m AS (
                        INSERT INTO {n.members} (stream, grp, member, name, joined, expires_at)
                        VALUES ($1, $2, $3, $4, nextval('{n.member_seq}'), now() + make_interval(secs => $5)))
                    SELECT pg_notify($6, $1)""",
                *self._group,
                self.member_id,
                self.name,
                self.ctx.options.session_timeout_s,
                n.data_channel,
            )
        self._heartbeats = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        n = self.ctx.names
        while True:
            await asyncio.sleep(self.ctx.options.heartbeat_interval_s)
            try:
                async with self.ctx.group_pool.acquire() as conn:
                    await conn.execute(
                        f"""WITH m AS (
                                UPDATE {n.members} SET expires_at = now() + make_interval(secs => $4)
                                WHERE stream = $1 AND grp = $2 AND member = $3)
                            UPDATE {n.group_partitions} SET owner_expires = now() + make_interval(secs => $4)
                            WHERE stream = $1 AND grp = $2 AND owner = $3""",
                        *self._group,
                        self.member_id,
                        self.ctx.options.session_timeout_s,
                    )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "group %s on %s: heartbeat of %s failed: %s", self.spec.group, self.stream, self.name, exc
                )

    # -- fetching ------------------------------------------------------------------------------------

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        check_fetch(max_messages, timeout)
        signal = self.ctx.core.signal(self.stream)
        deadline = time.monotonic() + timeout
        while True:
            self.ctx.core.check_open()
            if self.closed:
                raise MemberNotFoundError(f"member {self.name!r} left group {self.spec.group!r}")
            seen = signal.version
            got, due = await self._poll(max_messages)
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await signal.wait(seen, min(remaining, due, self.ctx.options.poll_interval_s))

    async def _poll(self, room: int) -> tuple[list[PgReceived], float]:
        n = self.ctx.names
        async with self.ctx.group_pool.acquire() as conn, conn.transaction():
            exists = await conn.fetchval(
                f"SELECT true FROM {n.groups} WHERE stream = $1 AND name = $2 FOR KEY SHARE", *self._group
            )
            if not exists:
                raise GroupNotFoundError(f"no group {self.spec.group!r} on stream {self.stream!r}")
            target = await self._assignment(conn)
            await self._release(conn, target)
            rows = await conn.fetch(
                f"""UPDATE {n.group_partitions}
                    SET owner = $4, owner_name = $5, owner_expires = now() + make_interval(secs => $6)
                    WHERE stream = $1 AND grp = $2 AND partition = ANY($3::int[])
                      AND (owner IS NULL OR owner = $4 OR owner_expires < now())
                    RETURNING partition, committed, delivered_upto, redelivered,
                              extract(epoch FROM paused_until - clock_timestamp())::float8 AS paused_for""",
                *self._group,
                sorted(target),
                self.member_id,
                self.name,
                self.ctx.options.session_timeout_s,
            )
            held = {row["partition"]: row for row in rows}
            for p in [p for p in self._owned if p in target and p not in held]:
                self._drop(p)  # another member took it while this one's heartbeat had lapsed
            for p, row in held.items():
                part = self._owned.get(p)
                # Ahead in the table: another member moved it on while this one was not the
                # owner (behind can only be this member's own commit, still on its way).
                if part is None or row["committed"] > part.committed:
                    self._owned[p] = _Part(
                        next(self._epochs),
                        row["committed"],
                        row["delivered_upto"],
                        {int(o): c for o, c in json.loads(row["redelivered"]).items()},
                    )
            return await self._read(conn, held, room)

    async def _assignment(self, conn: asyncpg.Connection) -> set[int]:
        """This member's share: p % n == i, for member i of the n live ones in join order."""
        n = self.ctx.names
        query = f"""SELECT member FROM {n.members} WHERE stream = $1 AND grp = $2 AND expires_at > now()
                    ORDER BY joined, member"""
        members = [r["member"] for r in await conn.fetch(query, *self._group)]
        if self.member_id not in members:
            # Its heartbeat lapsed (a long pause): back in, at its place in the join order.
            await conn.execute(
                f"""INSERT INTO {n.members} (stream, grp, member, name, joined, expires_at)
                    VALUES ($1, $2, $3, $4, nextval('{n.member_seq}'), now() + make_interval(secs => $5))
                    ON CONFLICT (stream, grp, member) DO UPDATE SET expires_at = excluded.expires_at""",
                *self._group,
                self.member_id,
                self.name,
                self.ctx.options.session_timeout_s,
            )
            members = [r["member"] for r in await conn.fetch(query, *self._group)]
        i, count = members.index(self.member_id), len(members)
        self._target = {p for p in range(self.partitions) if p % count == i} if i < self.partitions else set()
        return self._target

    async def _release(self, conn: asyncpg.Connection, target: set[int]) -> None:
        """Hand over what is no longer this member's share: at once when no batch is out,
        else once it is settled (see `_ack`), or after ack_wait_s at the latest."""
        now = time.monotonic()
        release = []
        for p, part in self._owned.items():
            if p in target:
                part.revoked_at = None
            elif not part.batch:
                release.append(p)
            elif part.revoked_at is None:
                part.revoked_at = now
            elif now - part.revoked_at > self.spec.ack_wait_s:
                release.append(p)
        if not release:
            return
        for p in release:
            self._drop(p)
        await conn.execute(
            f"""WITH u AS (
                    UPDATE {self.ctx.names.group_partitions}
                    SET owner = NULL, owner_name = NULL, owner_expires = NULL
                    WHERE stream = $1 AND grp = $2 AND partition = ANY($3::int[]) AND owner = $4)
                SELECT pg_notify($5, $1)""",
            *self._group,
            release,
            self.member_id,
            self.ctx.names.data_channel,
        )

    def _drop(self, p: int) -> None:
        part = self._owned.pop(p, None)
        if part is not None:
            part.epoch = -1  # its deliveries can no longer be settled

    async def _read(
        self, conn: asyncpg.Connection, held: dict[int, asyncpg.Record], room: int
    ) -> tuple[list[PgReceived], float]:
        out: list[PgReceived] = []
        due = math.inf
        order = sorted(held)
        if order:
            self._rotation = (self._rotation + 1) % len(order)
            order = order[self._rotation :] + order[: self._rotation]
        for p in order:
            part = self._owned[p]
            paused_for = held[p]["paused_for"]
            if part.batch or len(out) >= room:
                continue
            if paused_for is not None and paused_for > 0:
                due = min(due, paused_for + 0.001)
                continue
            messages = await read(conn, self.ctx.names, self.stream, p, part.committed, room - len(out))
            if not messages:
                continue
            first, end = messages[0].offset or 0, (messages[-1].offset or 0) + 1
            counts = [part.count_for(m.offset or 0) for m in messages]
            part.committed = max(part.committed, first)  # retention removed what lay between
            part.note_delivered(first, end)
            await conn.execute(
                f"""UPDATE {self.ctx.names.group_partitions} SET delivered_upto = $4, redelivered = $5::jsonb
                    WHERE stream = $1 AND grp = $2 AND partition = $3""",
                *self._group,
                p,
                part.delivered_upto,
                json.dumps({str(o): c for o, c in part.redelivered.items()}),
            )
            part.batch = [PgReceived(self, m, c, part.epoch) for m, c in zip(messages, counts, strict=True)]
            part.settled_prefix = 0
            out += part.batch
        return out, due

    # -- settling ------------------------------------------------------------------------------------

    def _part(self, received: PgReceived) -> _Part:
        part = self._owned.get(received.partition)
        if part is None or part.epoch != received.lease:
            raise DeliveryNotOwnedError(
                f"{received!r} is no longer held by its member (partition revoked or batch rewound)"
            )
        return part

    async def _commit(
        self,
        conn: asyncpg.Connection,
        received: PgReceived,
        committed: int,
        release: bool,
        paused_s: float = 0,
    ) -> None:
        """Write the committed offset (and a pause), only while still the owner."""
        n = self.ctx.names
        ok = await conn.fetchval(
            f"""WITH f AS (
                    DELETE FROM {n.failures}
                    WHERE stream = $1 AND grp = $2 AND partition = $3 AND "offset" < $4)
                UPDATE {n.group_partitions} SET committed = GREATEST(committed, $4),
                    paused_until = CASE WHEN $6::float8 > 0
                        THEN now() + make_interval(secs => $6::float8) END,
                    owner = CASE WHEN $5 THEN NULL ELSE owner END,
                    owner_name = CASE WHEN $5 THEN NULL ELSE owner_name END,
                    owner_expires = CASE WHEN $5 THEN NULL ELSE owner_expires END
                WHERE stream = $1 AND grp = $2 AND partition = $3 AND owner = $7
                RETURNING true""",
            *self._group,
            received.partition,
            committed,
            release,
            float(paused_s),
            self.member_id,
        )
        if not ok:
            self._drop(received.partition)
            raise DeliveryNotOwnedError(f"{received!r}: its partition was taken over by another member")
        if release:
            await conn.execute("SELECT pg_notify($1, $2)", n.data_channel, self.stream)

    def _advance(self, received: PgReceived, part: _Part) -> tuple[int, bool, bool] | None:
        """Mark the delivery done and move over the settled prefix, in memory and without
        awaiting (so concurrent acks of one batch each see the others'): (offset to commit,
        release the partition, batch finished), or None when the prefix did not move."""
        received.settled = True
        committed, done = part.advance()
        if committed <= part.committed:
            return None  # an ack after a gap: committed once the gap is settled
        release = done and received.partition not in self._target
        # A fetch running meanwhile reads from here, not from the old offset.
        part.committed = committed
        if done:
            part.batch = []
            part.settled_prefix = 0
            if release:
                self._drop(received.partition)
        return committed, release, done

    async def _settling(self, received: PgReceived, step: Awaitable[None]) -> None:
        part = self._owned.get(received.partition)
        try:
            await step
        except DeliveryNotOwnedError:
            raise  # the partition moved on (and was dropped if it was lost)
        except BaseException:
            # The table may be behind this member's memory: forget the partition, so the
            # next fetch takes it again from the committed offset (at least once).
            if part is not None and self._owned.get(received.partition) is part:
                self._drop(received.partition)
            raise

    async def _ack(self, received: PgReceived) -> None:
        plan = self._advance(received, self._part(received))
        if plan is None:
            return
        committed, release, done = plan
        # Commits asked for while a statement is on its way join the next one, which writes
        # only the highest offset per partition: acking a batch concurrently costs a round
        # trip or two, not one per message.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commits.setdefault(received.partition, []).append((committed, release, received, future))
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._flush_commits())
        await self._settling(received, future)
        if done:
            self.ctx.core.bump(self.stream)  # this member may be waiting for its next batch

    async def _flush_commits(self) -> None:
        try:
            await asyncio.sleep(0)  # let the acks of this turn of the loop join
            while self._commits:
                pending, self._commits = self._commits, {}
                try:
                    async with self.ctx.group_pool.acquire() as conn:
                        for items in pending.values():
                            highest = max(items, key=lambda item: item[0])
                            try:
                                await self._commit(
                                    conn, highest[2], highest[0], any(item[1] for item in items)
                                )
                            except DeliveryNotOwnedError as exc:
                                _fail([item[3] for item in items], exc)
                            else:
                                for item in items:
                                    if not item[3].done():
                                        item[3].set_result(None)
                except BaseException as exc:
                    _fail([item[3] for items in pending.values() for item in items], exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
        finally:
            self._committer = None
            if self._commits:  # cancelled (closing): nobody will send these
                pending, self._commits = self._commits, {}
                closed = TransportClosedError("the PostgreSQL transport is closed")
                _fail([item[3] for items in pending.values() for item in items], closed)

    async def _failures(self, conn: asyncpg.Connection, received: PgReceived, error: object) -> Failures:
        n = self.ctx.names
        key = (*self._group, received.partition, received.offset)
        row = await conn.fetchrow(
            f"""SELECT first_at, last_at, error_type, error_message FROM {n.failures}
                WHERE stream = $1 AND grp = $2 AND partition = $3 AND "offset" = $4 FOR UPDATE""",
            *key,
        )
        failures = note(failures_from(row), error)  # type: ignore[arg-type]
        await conn.execute(
            f"""INSERT INTO {n.failures}
                    (stream, grp, partition, "offset", first_at, last_at, error_type, error_message)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (stream, grp, partition, "offset") DO UPDATE SET last_at = excluded.last_at,
                    error_type = excluded.error_type, error_message = excluded.error_message""",
            *key,
            failures.first_at,
            failures.last_at,
            failures.error_type,
            failures.error_message,
        )
        return failures

    async def _give_up(self, received: PgReceived, error: object) -> None:
        """Dead-letter the message (when enabled) and move past it, in one transaction.

        Its settled flag stays down until the dead letter is written, so that a concurrent
        ack of a later message cannot commit past it first."""
        self._part(received)
        done = False

        async def step() -> None:
            nonlocal done
            async with self.ctx.group_pool.acquire() as conn, conn.transaction():
                failures = await self._failures(conn, received, error)
                if self.spec.dead_letter:
                    await self.ctx.dead_letter(
                        conn,
                        self.stream,
                        self.spec.group,
                        received.message,
                        received.delivery_count,
                        failures,
                    )
                plan = self._advance(received, self._part(received))
                if plan is not None:
                    await self._commit(conn, received, plan[0], plan[1])
                    done = plan[2]

        await self._settling(received, step())
        if done:
            self.ctx.core.bump(self.stream)

    async def _nack(
        self, received: PgReceived, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        part = self._part(received)
        count = received.delivery_count
        if self.spec.max_deliver is not None and count >= self.spec.max_deliver:
            await self._give_up(received, error)
            return
        if delay is None:
            delay = self.spec.backoff.delay(count) if self.spec.backoff else 0.0
        # Rewind to the first unsettled message (normally this one): it and everything after
        # it come again, in order; the rest of this batch can no longer be settled.
        committed, _ = part.advance()
        committed = min(committed, received.offset)
        received.settled = True
        part.committed = max(part.committed, committed)
        part.epoch = next(self._epochs)
        part.batch = []
        part.settled_prefix = 0

        async def step() -> None:
            async with self.ctx.group_pool.acquire() as conn, conn.transaction():
                await self._failures(conn, received, error)
                await self._commit(conn, received, committed, False, delay)

        await self._settling(received, step())
        self.ctx.core.bump(self.stream)

    async def _term(self, received: PgReceived, reason: BaseException | str | None) -> None:
        await self._give_up(received, reason or "terminated")

    async def _in_progress(self, received: PgReceived) -> None:
        self._part(received)  # ownership is kept by the heartbeats; only check it is still held

    async def close(self) -> None:
        """Leave: the partitions go to the other members (acked progress is committed already)."""
        if self.closed:
            return
        self.closed = True
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
        for p in list(self._owned):
            self._drop(p)
        if self.ctx.core.closed:
            return
        n = self.ctx.names
        async with self.ctx.group_pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"""UPDATE {n.group_partitions} SET owner = NULL, owner_name = NULL, owner_expires = NULL
                    WHERE stream = $1 AND grp = $2 AND owner = $3""",
                *self._group,
                self.member_id,
            )
            await conn.execute(
                f"""WITH d AS (DELETE FROM {n.members} WHERE stream = $1 AND grp = $2 AND member = $3)
                    SELECT pg_notify($4, $1)""",
                *self._group,
                self.member_id,
                n.data_channel,
            )
        self.ctx.core.bump(self.stream)


def _fail(futures: list[asyncio.Future[None]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
