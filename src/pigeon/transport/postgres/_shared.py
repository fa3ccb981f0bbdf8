"""Shared groups: a delivery table of leases, claimed with ``FOR UPDATE SKIP LOCKED``.

Per partition the group has a cursor, the next offset it has not handed out yet, and one row
in ``deliveries`` per message handed out and not finished. A fetch, in one transaction:

1. claims rows due again (nacked and past ``not_before``, or leased past ``leased_until``)
   with ``FOR UPDATE SKIP LOCKED``, so concurrent members never wait for, or take, each
   other's rows; a row already delivered ``max_deliver`` times is dead-lettered instead;
2. takes new messages from the cursors under the group's advisory lock (members take new
   messages one at a time, which keeps ``max_ack_pending`` exact), and inserts their rows,
   leased to the member. An advisory lock rather than the group row's: upgrading the row's
   KEY SHARE lock while `delete_group` waits for it would deadlock.

An ack deletes the row (checking the lease token, so a member that lost its lease gets
`DeliveryNotOwnedError`); nack marks it ready again after the delay (``not_before``); term
and the last allowed failure write the dead letter and delete the row in one transaction.
Everything below a cursor without a row is finished. ``key_ordered``: a message whose key has
an unfinished message before it is inserted parked (``ready``, 0 deliveries) and only
claimable once it is the oldest unfinished message of its key.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Sequence

import asyncpg  # type: ignore[import-untyped]

from ...engine.groups.base import check_fetch, check_nack_delay
from ...errors import DeliveryNotOwnedError, GroupNotFoundError, MemberNotFoundError, TransportClosedError
from ...message import Message
from ..base import ConsumerSpec, Received
from ._codec import MESSAGE_COLUMNS, row_message
from ._groups import GroupConsumer, GroupContext, PgReceived, failures_from, note

_FAILURE_COLUMNS = "first_failure_at AS first_at, last_failure_at AS last_at, error_type, error_message"


class SharedConsumer(GroupConsumer):
    def __init__(
        self, ctx: GroupContext, stream: str, spec: ConsumerSpec, name: str, partitions: int
    ) -> None:
        super().__init__(ctx, stream, spec, name, partitions)
        self.member_id = f"{name}#{secrets.token_hex(4)}"
        self._rotation = 0
        self._acks: list[tuple[PgReceived, asyncio.Future[bool]]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._where = 'stream = $1 AND grp = $2 AND partition = $3 AND "offset" = $4 AND lease = $5'

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        check_fetch(max_messages, timeout)
        signal = self.ctx.core.signal(self.stream)
        deadline = time.monotonic() + timeout
        while True:
            self.ctx.core.check_open()
            if self.closed:
                raise MemberNotFoundError(f"member {self.name!r} left group {self.spec.group!r}")
            seen = signal.version
            got, due = await self._claim(max_messages)
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await signal.wait(seen, min(remaining, due, self.ctx.options.poll_interval_s))

    async def _claim(self, room: int) -> tuple[list[PgReceived], float]:
        """Claim up to ``room`` deliveries; when none, also how long until one is due."""
        n = self.ctx.names
        out: list[PgReceived] = []
        token = secrets.randbits(62)
        async with self.ctx.group_pool.acquire() as conn, conn.transaction():
            exists = await conn.fetchval(
                f"SELECT true FROM {n.groups} WHERE stream = $1 AND name = $2 FOR KEY SHARE",
                self.stream,
                self.spec.group,
            )
            if not exists:
                raise GroupNotFoundError(f"no group {self.spec.group!r} on stream {self.stream!r}")
            out += await self._claim_again(conn, room, token)
            if len(out) < room:
                out += await self._claim_new(conn, room - len(out), token)
            if out:
                return out, 0.0
            due = await conn.fetchval(
                f"""SELECT extract(epoch FROM least(
                        (SELECT min(not_before) FROM {n.deliveries}
                         WHERE stream = $1 AND grp = $2 AND state = 'ready' AND not_before > now()),
                        (SELECT min(leased_until) FROM {n.deliveries}
                         WHERE stream = $1 AND grp = $2 AND state = 'leased'))
                    - clock_timestamp())::float8""",
                self.stream,
                self.spec.group,
            )
        return out, math.inf if due is None else max(0.0, due) + 0.001

    async def _claim_again(self, conn: asyncpg.Connection, room: int, token: int) -> list[PgReceived]:
        n = self.ctx.names
        key_rule = ""
        if self.spec.key_ordered:
            key_rule = f"""AND NOT EXISTS (
                SELECT 1 FROM {n.deliveries} e WHERE e.stream = d.stream AND e.grp = d.grp
                AND e.partition = d.partition AND e.key = d.key AND e."offset" < d."offset")"""
        rows = await conn.fetch(
            f"""SELECT partition, "offset", delivery_count, state, {_FAILURE_COLUMNS}
                FROM {n.deliveries} d
                WHERE stream = $1 AND grp = $2
                  AND ((state = 'ready' AND not_before <= now())
                       OR (state = 'leased' AND leased_until <= now()))
                  {key_rule}
                ORDER BY partition, "offset" LIMIT $3 FOR UPDATE SKIP LOCKED""",
            self.stream,
            self.spec.group,
            room,
        )
        if not rows:
            return []
        messages = await self._messages(conn, [(r["partition"], r["offset"]) for r in rows])
        expiry = f"not acknowledged within ack_wait ({self.spec.ack_wait_s}s)"
        max_deliver = self.spec.max_deliver
        finished: list[tuple[int, int]] = []
        again: list[tuple[int, int]] = []
        for row in rows:
            where = (row["partition"], row["offset"])
            message = messages.get(where)
            if message is None:  # removed by retention meanwhile
                finished.append(where)
            elif max_deliver is not None and row["delivery_count"] >= max_deliver:
                failures = failures_from(row)
                if row["state"] == "leased":
                    note(failures, expiry)
                elif not failures.error_type:
                    note(
                        failures, f"delivered {row['delivery_count']} times (max_deliver) without an outcome"
                    )
                if self.spec.dead_letter:
                    await self.ctx.dead_letter(
                        conn, self.stream, self.spec.group, message, row["delivery_count"], failures
                    )
                finished.append(where)
            else:
                again.append(where)
        if finished:
            await conn.execute(
                f"""DELETE FROM {n.deliveries} WHERE stream = $1 AND grp = $2
                    AND (partition, "offset") IN (SELECT * FROM unnest($3::int[], $4::bigint[]))""",
                self.stream,
                self.spec.group,
                [p for p, _ in finished],
                [o for _, o in finished],
            )
        if not again:
            return []
        # An expired lease is a failure: noted for the dead letter, as a nack would be.
        leased = await conn.fetch(
            f"""UPDATE {n.deliveries} SET
                    first_failure_at = CASE WHEN state = 'leased'
                        THEN coalesce(first_failure_at, $5) ELSE first_failure_at END,
                    last_failure_at = CASE WHEN state = 'leased' THEN $5 ELSE last_failure_at END,
                    error_type = CASE WHEN state = 'leased' THEN 'Error' ELSE error_type END,
                    error_message = CASE WHEN state = 'leased' THEN $6 ELSE error_message END,
                    state = 'leased', delivery_count = delivery_count + 1, lease = $7, member = $8,
                    leased_until = now() + make_interval(secs => $9)
                WHERE stream = $1 AND grp = $2
                  AND (partition, "offset") IN (SELECT * FROM unnest($3::int[], $4::bigint[]))
                RETURNING partition, "offset", delivery_count""",
            self.stream,
            self.spec.group,
            [p for p, _ in again],
            [o for _, o in again],
            time.time(),
            expiry,
            token,
            self.member_id,
            self.spec.ack_wait_s,
        )
        out = [
            PgReceived(self, messages[(r["partition"], r["offset"])], r["delivery_count"], token)
            for r in leased
        ]
        out.sort(key=lambda r: (r.partition, r.offset))
        return out

    async def _claim_new(self, conn: asyncpg.Connection, room: int, token: int) -> list[PgReceived]:
        n = self.ctx.names
        group = (self.stream, self.spec.group)
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"{n.schema}:claim:{self.stream}:{self.spec.group}"
        )
        pending = await conn.fetchval(
            f"SELECT count(*) FROM {n.deliveries} WHERE stream = $1 AND grp = $2", *group
        )
        allowed = min(room, self.spec.max_ack_pending - pending)
        if allowed <= 0:
            self.ctx.blocked.add(group)
            return []
        rows = await conn.fetch(
            f"""SELECT m.* FROM {n.cursors} c CROSS JOIN LATERAL (
                    SELECT {MESSAGE_COLUMNS} FROM {n.messages} m
                    WHERE m.stream = c.stream AND m.partition = c.partition AND m."offset" >= c.next_offset
                    ORDER BY m."offset" LIMIT $3) m
                WHERE c.stream = $1 AND c.grp = $2""",
            *group,
            allowed,
        )
        if not rows:
            if not self.spec.key_ordered:
                self.ctx.blocked.discard(group)
            return []
        # Take from the partitions in turn (each one's messages in offset order), starting
        # at a different partition each time so that a busy one cannot starve the others.
        queues: dict[int, deque[Message]] = {}
        for row in rows:
            queues.setdefault(row["partition"], deque()).append(row_message(self.stream, row))
        order = sorted(queues)
        self._rotation = (self._rotation + 1) % len(order)
        order = order[self._rotation :] + order[: self._rotation]
        chosen: list[Message] = []
        while len(chosen) < allowed and any(queues.values()):
            for p in order:
                if queues[p] and len(chosen) < allowed:
                    chosen.append(queues[p].popleft())
        chosen.sort(key=lambda m: (m.partition or 0, m.offset or 0))
        leased = [True] * len(chosen)
        if self.spec.key_ordered:
            keys = sorted({m.key for m in chosen if m.key is not None})
            held = {
                r["key"]
                for r in await conn.fetch(
                    f"""SELECT DISTINCT key FROM {n.deliveries}
                        WHERE stream = $1 AND grp = $2 AND key = ANY($3)""",
                    *group,
                    keys,
                )
            }
            for i, m in enumerate(chosen):
                if m.key is not None:
                    leased[i] = m.key not in held
                    held.add(m.key)
        await conn.execute(
            f"""INSERT INTO {n.deliveries}
                    (stream, grp, partition, "offset", key, state, delivery_count, lease, member,
                     leased_until)
                SELECT $1, $2, p, o, k, CASE WHEN l THEN 'leased' ELSE 'ready' END,
                       CASE WHEN l THEN 1 ELSE 0 END,
                       CASE WHEN l THEN $3::bigint END, CASE WHEN l THEN $4 END,
                       CASE WHEN l THEN now() + make_interval(secs => $5) END
                FROM unnest($6::int[], $7::bigint[], $8::text[], $9::bool[]) AS u(p, o, k, l)""",
            *group,
            token,
            self.member_id,
            self.spec.ack_wait_s,
            [m.partition for m in chosen],
            [m.offset for m in chosen],
            [m.key if self.spec.key_ordered else None for m in chosen],
            leased,
        )
        ends: dict[int, int] = {}
        for m in chosen:
            ends[m.partition or 0] = (m.offset or 0) + 1
        await conn.execute(
            f"""UPDATE {n.cursors} c SET next_offset = u.o
                FROM unnest($3::int[], $4::bigint[]) AS u(p, o)
                WHERE c.stream = $1 AND c.grp = $2 AND c.partition = u.p""",
            *group,
            list(ends),
            list(ends.values()),
        )
        if not all(leased):
            self.ctx.blocked.add(group)
        return [PgReceived(self, m, 1, token) for m, lease in zip(chosen, leased, strict=True) if lease]

    async def _messages(
        self, conn: asyncpg.Connection, where: list[tuple[int, int]]
    ) -> dict[tuple[int, int], Message]:
        rows = await conn.fetch(
            f"""SELECT {MESSAGE_COLUMNS} FROM {self.ctx.names.messages}
                WHERE stream = $1
                  AND (partition, "offset") IN (SELECT * FROM unnest($2::int[], $3::bigint[]))""",
            self.stream,
            [p for p, _ in where],
            [o for _, o in where],
        )
        return {(r["partition"], r["offset"]): row_message(self.stream, r) for r in rows}

    # -- settling ---------------------------------------------------------------------------------

    def _not_owned(self, received: PgReceived) -> DeliveryNotOwnedError:
        return DeliveryNotOwnedError(
            f"{received!r} is no longer held by its member (lease expired and taken, or member closed)"
        )

    def _key(self, received: PgReceived) -> tuple[str, str, int, int, int]:
        return (self.stream, self.spec.group, received.partition, received.offset, received.lease)

    def _woken(self) -> None:
        if self.spec.key_ordered or (self.stream, self.spec.group) in self.ctx.blocked:
            self.ctx.core.bump(self.stream)

    async def _ack(self, received: PgReceived) -> None:
        # Acks made while a statement is on its way join the next one: acking a batch
        # concurrently costs a round trip or two, not one per message.
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((received, future))
        if self._ack_flusher is None:
            self._ack_flusher = asyncio.get_running_loop().create_task(self._flush_acks())
        if not await future:
            raise self._not_owned(received)
        self._woken()

    async def _flush_acks(self) -> None:
        n = self.ctx.names
        try:
            await asyncio.sleep(0)  # let the acks of this turn of the loop join
            while self._acks:
                batch, self._acks = self._acks, []
                try:
                    async with self.ctx.group_pool.acquire() as conn:
                        # Other processes' members learn of a freed key by NOTIFY; room under
                        # max_ack_pending they find on their next look (poll_interval_s).
                        rows = await conn.fetch(
                            f"""WITH d AS (
                                    DELETE FROM {n.deliveries}
                                    WHERE stream = $1 AND grp = $2 AND state = 'leased'
                                      AND (partition, "offset", lease) IN (
                                          SELECT * FROM unnest($3::int[], $4::bigint[], $5::bigint[]))
                                    RETURNING partition, "offset", key)
                                SELECT d.partition, d."offset" FROM d, LATERAL (
                                    SELECT count(pg_notify($6, $1)) WHERE d.key IS NOT NULL AND $7) x""",
                            self.stream,
                            self.spec.group,
                            [r.partition for r, _ in batch],
                            [r.offset for r, _ in batch],
                            [r.lease for r, _ in batch],
                            n.data_channel,
                            self.spec.key_ordered,
                        )
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                done = {(r["partition"], r["offset"]) for r in rows}
                for received, future in batch:
                    if not future.done():
                        future.set_result((received.partition, received.offset) in done)
        finally:
            self._ack_flusher = None
            if self._acks:  # cancelled (closing): nobody will send these
                batch, self._acks = self._acks, []
                for _, future in batch:
                    if not future.done():
                        future.set_exception(TransportClosedError("the PostgreSQL transport is closed"))

    async def _locked(self, conn: asyncpg.Connection, received: PgReceived) -> asyncpg.Record:
        row = await conn.fetchrow(
            f"""SELECT delivery_count, {_FAILURE_COLUMNS} FROM {self.ctx.names.deliveries}
                WHERE {self._where} AND state = 'leased' FOR UPDATE""",
            *self._key(received),
        )
        if row is None:
            raise self._not_owned(received)
        return row

    async def _finish(self, conn: asyncpg.Connection, received: PgReceived) -> None:
        n = self.ctx.names
        await conn.execute(
            f"""WITH d AS (DELETE FROM {n.deliveries} WHERE {self._where})
                SELECT pg_notify($6, $1)""",
            *self._key(received),
            n.data_channel,
        )

    async def _nack(
        self, received: PgReceived, delay: float | None, error: BaseException | str | None
    ) -> None:
        check_nack_delay(delay)
        n = self.ctx.names
        async with self.ctx.group_pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, received)
            failures = note(failures_from(row), error)
            count = row["delivery_count"]
            if self.spec.max_deliver is not None and count >= self.spec.max_deliver:
                if self.spec.dead_letter:
                    await self.ctx.dead_letter(
                        conn, self.stream, self.spec.group, received.message, count, failures
                    )
                await self._finish(conn, received)
            else:
                if delay is None:
                    delay = self.spec.backoff.delay(count) if self.spec.backoff else 0.0
                await conn.execute(
                    f"""WITH u AS (
                            UPDATE {n.deliveries} SET state = 'ready', lease = NULL, member = NULL,
                                leased_until = NULL, not_before = now() + make_interval(secs => $6),
                                first_failure_at = $7, last_failure_at = $8,
                                error_type = $9, error_message = $10
                            WHERE {self._where})
                        SELECT pg_notify($11, $1)""",
                    *self._key(received),
                    delay,
                    failures.first_at,
                    failures.last_at,
                    failures.error_type or None,
                    failures.error_message or None,
                    n.data_channel,
                )
        self.ctx.core.bump(self.stream)

    async def _term(self, received: PgReceived, reason: BaseException | str | None) -> None:
        async with self.ctx.group_pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, received)
            failures = note(failures_from(row), reason or "terminated")
            if self.spec.dead_letter:
                await self.ctx.dead_letter(
                    conn, self.stream, self.spec.group, received.message, received.delivery_count, failures
                )
            await self._finish(conn, received)
        self._woken()

    async def _in_progress(self, received: PgReceived) -> None:
        async with self.ctx.group_pool.acquire() as conn:
            extended = await conn.fetchval(
                f"""UPDATE {self.ctx.names.deliveries} SET leased_until = now() + make_interval(secs => $6)
                    WHERE {self._where} AND state = 'leased' RETURNING true""",
                *self._key(received),
                self.spec.ack_wait_s,
            )
        if not extended:
            raise self._not_owned(received)

    async def close(self) -> None:
        """Leave: what this member holds becomes ready at once (one more failed delivery each)."""
        if self.closed:
            return
        self.closed = True
        if self.ctx.core.closed:
            return
        n = self.ctx.names
        now = time.time()
        async with self.ctx.group_pool.acquire() as conn:
            await conn.execute(
                f"""WITH u AS (
                        UPDATE {n.deliveries} SET state = 'ready', lease = NULL, member = NULL,
                            leased_until = NULL, not_before = '-infinity',
                            first_failure_at = coalesce(first_failure_at, $4), last_failure_at = $4,
                            error_type = 'Error', error_message = $5
                        WHERE stream = $1 AND grp = $2 AND member = $3 AND state = 'leased'
                        RETURNING 1)
                    SELECT pg_notify($6, $1) WHERE EXISTS (SELECT FROM u)""",
                self.stream,
                self.spec.group,
                self.member_id,
                now,
                f"member {self.name!r} left",
                n.data_channel,
            )
        self.ctx.core.bump(self.stream)
