"""What shared and ordered groups have in common: their context, deliveries, creation, dead letters."""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ...engine.config import validate_name
from ...engine.groups.deadletter import Failures, dead_letter_message, dead_letter_subject
from ...errors import AlreadySettledError, GroupExistsError, InvalidNameError, StreamNotFoundError
from ...message import Message
from ..base import Consumer, ConsumerSpec, PartitionLag, StreamSpec
from ._codec import Outgoing
from ._core import Core
from ._options import Names, PostgresOptions
from ._streams import Writer, dumps, resolve_start


@dataclass
class GroupContext:
    """What a consumer needs from its transport."""

    pool: asyncpg.Pool
    # Claims and settlements: without durable_acks, a pool whose commits do not wait for the
    # WAL flush (a crash can forget the last ones, which only means delivering them again).
    group_pool: asyncpg.Pool
    names: Names
    options: PostgresOptions
    writer: Writer
    core: Core
    ensure_stream: Callable[[StreamSpec], Awaitable[None]]
    # Groups some local member found blocked (max_ack_pending, keys in flight): an ack there
    # wakes this process's waiting members at once.
    blocked: set[tuple[str, str]] = field(default_factory=set)

    async def dead_letter(
        self,
        conn: asyncpg.Connection,
        stream: str,
        group: str,
        message: Message,
        delivery_count: int,
        failures: Failures,
    ) -> None:
        """Store the dead letter in ``conn``'s transaction: atomic with leaving the group."""
        subject = dead_letter_subject(stream, group)
        letter = dead_letter_message(message, group, delivery_count, failures, subject)
        if self.writer.registry.route(subject) is None:
            # Deleted by hand since the group was created: make it again (its own transaction).
            await self.ensure_stream(dead_letter_spec(stream, group))
            await self.writer.reload()
        item = Outgoing(
            letter.subject, letter.payload, key=letter.key, headers=letter.headers, msg_id=letter.id
        )
        await self.writer.publish(conn, [item])


def dead_letter_name(stream: str, group: str) -> str:
    name = f"{stream}-{group}-dlq"
    try:
        return validate_name(name)
    except InvalidNameError:
        raise InvalidNameError(
            f"group {group!r} on stream {stream!r}: the dead-letter stream name {name!r} would "
            "exceed 64 characters; use shorter names or dead_letter=False"
        ) from None


def dead_letter_spec(stream: str, group: str) -> StreamSpec:
    return StreamSpec(dead_letter_name(stream, group), (dead_letter_subject(stream, group),))


def failures_from(row: asyncpg.Record | None, prefix: str = "") -> Failures:
    if row is None:
        return Failures()
    return Failures(
        first_at=row[f"{prefix}first_at"] or 0.0,
        last_at=row[f"{prefix}last_at"] or 0.0,
        error_type=row[f"{prefix}error_type"] or "",
        error_message=row[f"{prefix}error_message"] or "",
    )


def spec_document(spec: ConsumerSpec) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "start": [spec.start.kind, spec.start.value],
        "ack_wait_s": spec.ack_wait_s,
        "max_deliver": spec.max_deliver,
        "backoff": None if spec.backoff is None else asdict(spec.backoff),
        "max_ack_pending": spec.max_ack_pending,
        "key_ordered": spec.key_ordered,
        "dead_letter": spec.dead_letter,
    }


async def ensure_group(ctx: GroupContext, stream: str, spec: ConsumerSpec) -> int:
    """Create the group (with its dead-letter stream) or check it matches; its partition count."""
    n = ctx.names
    if spec.dead_letter:
        # Created with the group, not at the first failure: a name too long fails now.
        await ctx.ensure_stream(dead_letter_spec(stream, spec.group))
    document = spec_document(spec)
    async with ctx.pool.acquire() as conn, conn.transaction():
        # KEY SHARE: a concurrent delete_stream waits for this to finish.
        partitions = await conn.fetchval(
            f"SELECT partitions FROM {n.streams} WHERE name = $1 FOR KEY SHARE", stream
        )
        if partitions is None:
            raise StreamNotFoundError(f"no stream named {stream!r}")
        created = await conn.fetchval(
            f"""INSERT INTO {n.groups} (stream, name, kind, spec) VALUES ($1, $2, $3, $4::jsonb)
                ON CONFLICT (stream, name) DO NOTHING RETURNING true""",
            stream,
            spec.group,
            spec.kind,
            dumps(document),
        )
        if not created:
            existing = await conn.fetchval(
                f"SELECT spec FROM {n.groups} WHERE stream = $1 AND name = $2", stream, spec.group
            )
            if existing is not None and json.loads(existing) != json.loads(dumps(document)):
                raise GroupExistsError(
                    f"group {spec.group!r} on stream {stream!r} exists with a different configuration"
                )
            return int(partitions)
        starts = await resolve_start(conn, n, stream, partitions, spec.start)
        if spec.kind == "shared":
            await conn.execute(
                f"""INSERT INTO {n.cursors} (stream, grp, partition, next_offset)
                    SELECT $1, $2, p - 1, o FROM unnest($3::bigint[]) WITH ORDINALITY AS u(o, p)""",
                stream,
                spec.group,
                starts,
            )
        else:
            await conn.execute(
                f"""INSERT INTO {n.group_partitions} (stream, grp, partition, committed, delivered_upto)
                    SELECT $1, $2, p - 1, o, o FROM unnest($3::bigint[]) WITH ORDINALITY AS u(o, p)""",
                stream,
                spec.group,
                starts,
            )
        return int(partitions)


class PgReceived:
    """A message delivered to a member, with the operations that settle it (`Received`)."""

    __slots__ = ("_owner", "delivery_count", "lease", "message", "settled", "settling")

    def __init__(self, owner: GroupConsumer, message: Message, delivery_count: int, lease: int) -> None:
        self._owner = owner
        self.message = message
        self.delivery_count = delivery_count
        self.lease = lease  # shared: the lease token; ordered: the partition's epoch
        self.settled = False  # done with (ordered groups commit the prefix of settled ones)
        self.settling = False

    @property
    def partition(self) -> int:
        return self.message.partition  # type: ignore[return-value]

    @property
    def offset(self) -> int:
        return self.message.offset  # type: ignore[return-value]

    async def ack(self) -> None:
        await self._settle(self._owner._ack(self))

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._settle(self._owner._nack(self, delay, error))

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._settle(self._owner._term(self, reason))

    async def _settle(self, operation: Coroutine[Any, Any, None]) -> None:
        # One settlement at a time: a second one racing this is refused; if this one fails,
        # the delivery is unsettled again (the member may retry, or learn why it cannot).
        try:
            self._owner._check_settle(self)
        except BaseException:
            operation.close()
            raise
        self.settling = True
        try:
            await operation
            self.settled = True
        except BaseException:
            self.settled = False
            raise
        finally:
            self.settling = False

    async def in_progress(self) -> None:
        self._owner._check_settle(self)
        await self._owner._in_progress(self)

    def __repr__(self) -> str:
        m = self.message
        return (
            f"<PgReceived {m.subject!r} {m.stream}[{self.partition}]@{self.offset} "
            f"delivery={self.delivery_count}>"
        )


class GroupConsumer(Consumer):
    def __init__(
        self, ctx: GroupContext, stream: str, spec: ConsumerSpec, name: str, partitions: int
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.spec = spec
        self.name = name
        self.partitions = partitions
        self.closed = False

    def _check_settle(self, received: PgReceived) -> None:
        if received.settled or received.settling:
            raise AlreadySettledError(f"{received!r} was settled already")

    @abstractmethod
    async def _ack(self, received: PgReceived) -> None: ...

    @abstractmethod
    async def _nack(
        self, received: PgReceived, delay: float | None, error: BaseException | str | None
    ) -> None: ...

    @abstractmethod
    async def _term(self, received: PgReceived, reason: BaseException | str | None) -> None: ...

    @abstractmethod
    async def _in_progress(self, received: PgReceived) -> None: ...


def note(failures: Failures, error: BaseException | str | None) -> Failures:
    failures.note(error, time.time())
    return failures


def ordered_lag(r: asyncpg.Record) -> PartitionLag:
    head = r["head"]
    committed = min(max(r["committed"], head if r["first"] is None else r["first"]), head)
    in_flight = max(0, min(r["delivered_upto"], head) - committed) if r["live"] else 0
    return PartitionLag(
        partition=r["partition"],
        head=head,
        committed=committed,
        lag=head - committed,
        pending=head - committed - in_flight,
        in_flight=in_flight,
        waiting=0,
        owner=r["owner_name"] if r["live"] else None,
    )


def shared_lag(r: asyncpg.Record) -> PartitionLag:
    head = r["head"]
    first = head if r["first"] is None else r["first"]
    cursor = min(max(r["cursor"], first), head)
    committed = cursor if r["lowest"] is None else min(max(r["lowest"], first), cursor)
    waiting = r["rows"] - r["leased"] - r["parked"]
    return PartitionLag(
        partition=r["partition"],
        head=head,
        committed=committed,
        lag=head - committed,
        pending=head - cursor + r["parked"],
        in_flight=r["leased"],
        waiting=max(0, waiting),
        owner=None,
    )
