"""Streams: the registry of streams, the write path (offsets, dedup, NOTIFY), reads, retention.

The write path is the heart of the ordering guarantee. Every write to a partition first
updates that partition's counter row (``UPDATE partitions SET next_offset = next_offset + n
... RETURNING``), which row-locks it until the transaction ends, and inserts its messages at
the offsets it got, in the same transaction. Writers to one partition therefore commit one
after another in offset order: once a reader sees offset n, every offset below n is visible
too, and a reader that remembers "next offset to read" never skips a message that committed
late. A transaction that rolls back rolls its counter back too, so offsets stay dense.

Lock order, to keep concurrent writers free of deadlocks: dedup rows (sorted by stream and
id), then counter rows (sorted by stream and partition).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ...engine.murmur2 import partition_for_key
from ...engine.stream import PubAck
from ...errors import InvalidConfigError, StreamNotFoundError
from ...message import Message, format_id, new_id_base
from ...subjects import SubjectIndex
from ..base import StartAt, StreamSpec
from ._codec import (
    MESSAGE_COLUMNS,
    NOTIFY_LIMIT,
    Outgoing,
    blob_reference,
    core_frame,
    headers_json,
    row_message,
)
from ._core import INBOX_PREFIX, Core
from ._options import Names

log = logging.getLogger("pigeon.transport.postgres")

_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class StreamEntry:
    name: str
    generation: int
    spec: StreamSpec


class _Stale(Exception):
    """The cached registry no longer matches the database: reload it and try again."""


class Registry:
    """The streams, cached; reloaded when the control channel says they changed."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.version = -1
        self.streams: dict[str, StreamEntry] = {}
        self._routes: SubjectIndex[StreamEntry] = SubjectIndex()

    def route(self, subject: str) -> StreamEntry | None:
        found = self._routes.match(subject)
        return found[0] if found else None

    async def load(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            f"""SELECT m.version, s.* FROM {self.names.meta} m
                LEFT JOIN {self.names.streams} s ON true ORDER BY s.name"""
        )
        streams = {}
        routes: SubjectIndex[StreamEntry] = SubjectIndex()
        for row in rows:
            if row["name"] is None:
                continue
            entry = StreamEntry(row["name"], row["generation"], spec_from_row(row))
            streams[entry.name] = entry
            for pattern in entry.spec.subjects:
                routes.add(pattern, entry)
        self.version = rows[0]["version"]
        self.streams = streams
        self._routes = routes


def spec_from_row(row: asyncpg.Record) -> StreamSpec:
    return StreamSpec(
        name=row["name"],
        subjects=tuple(row["subjects"]),
        partitions=row["partitions"],
        max_age_s=row["max_age_s"],
        max_msgs=row["max_msgs"],
        max_bytes=row["max_bytes"],
        dedup_window_s=row["dedup_window_s"],
    )


@dataclass
class _Planned:
    index: int
    item: Outgoing
    entry: StreamEntry | None
    partition: int = 0
    offset: int = -1
    duplicate: bool = False
    duplicate_of: int | None = None  # an earlier message of the same batch with the same id


class Writer:
    """Stores messages in the streams capturing their subjects and NOTIFYs core subscribers."""

    def __init__(self, pool: asyncpg.Pool, names: Names, registry: Registry, core: Core) -> None:
        self.pool = pool
        self.names = names
        self.registry = registry
        self.core = core
        self._turn: dict[str, int] = {}
        self._reload_lock = asyncio.Lock()

    async def reload(self, seen_version: int | None = None) -> None:
        async with self._reload_lock:
            if seen_version is not None and self.registry.version != seen_version:
                return  # someone reloaded meanwhile
            async with self.pool.acquire() as conn:
                await self.registry.load(conn)

    async def publish(
        self, conn: asyncpg.Connection | None, items: Sequence[Outgoing], *, store: bool = True
    ) -> list[PubAck | None]:
        """Store and announce ``items``; with ``conn``, inside the caller's transaction."""
        self.core.check_open()
        notified: set[int] = set()  # core frames already sent by an earlier attempt
        for _ in range(_MAX_ATTEMPTS):
            version = self.registry.version
            plan = [
                _Planned(i, item, self.registry.route(item.subject) if store else None)
                for i, item in enumerate(items)
            ]
            self._choose_partitions(plan)
            try:
                if conn is not None:
                    async with conn.transaction():
                        return await self._write(conn, plan, notified, version)
                async with self.pool.acquire() as own:
                    if all(p.entry is None for p in plan):
                        return await self._core_only(own, plan, notified, store, version)
                    if _fast(plan):
                        return await self._write_fast(own, plan, notified)
                    async with own.transaction():
                        return await self._write(own, plan, notified, version)
            except _Stale:
                await self.reload(version)
            except asyncpg.DeadlockDetectedError:
                log.warning("deadlock while publishing; retrying")
        raise StreamNotFoundError(
            "the streams changed under this publish repeatedly; the registry could not settle"
        )

    def _choose_partitions(self, plan: list[_Planned]) -> None:
        # Unkeyed messages of one call go to one partition, the next call's to the next: an
        # even spread that keeps a batch within one counter row (one lock, one statement).
        chosen: dict[str, int] = {}
        for p in plan:
            entry = p.entry
            if entry is None:
                continue
            count = entry.spec.partitions
            if p.item.key is not None:
                p.partition = partition_for_key(p.item.key.encode(), count)
            else:
                if entry.name not in chosen:
                    turn = self._turn.get(entry.name, -1) + 1
                    self._turn[entry.name] = turn
                    chosen[entry.name] = turn % count
                p.partition = chosen[entry.name]

    # -- core frames -----------------------------------------------------------------------------

    def _frames(
        self, plan: list[_Planned], notified: set[int]
    ) -> tuple[list[str], list[str], list[uuid.UUID], list[bytes]]:
        """(channels, payloads) to NOTIFY, and blobs to store, for the messages to announce."""
        channels: list[str] = []
        payloads: list[str] = []
        blob_ids: list[uuid.UUID] = []
        blobs: list[bytes] = []
        streams = {p.entry.name for p in plan if p.entry is not None and not p.duplicate}
        for name in sorted(streams):
            channels.append(self.names.data_channel)
            payloads.append(name)
        for p in plan:
            if p.duplicate or p.index in notified:
                continue
            subject = p.item.subject
            targets: list[str]
            if subject.startswith(INBOX_PREFIX):
                listened, targets = True, []  # replies: the requester always listens
            else:
                listened, targets = self.core.interest.route(subject)
            if not listened:
                continue
            frame = core_frame(p.item, targets)
            if len(frame) > NOTIFY_LIMIT // 4 and len(frame.encode()) > NOTIFY_LIMIT:
                blob_id = uuid.uuid4()
                blob_ids.append(blob_id)
                blobs.append(frame.encode())
                frame = blob_reference(subject, str(blob_id), targets)
            channels.append(self.names.core_channel)
            payloads.append(frame)
        return channels, payloads, blob_ids, blobs

    async def _core_only(
        self, conn: asyncpg.Connection, plan: list[_Planned], notified: set[int], store: bool, version: int
    ) -> list[PubAck | None]:
        channels, payloads, blob_ids, blobs = self._frames(plan, notified)
        if not store:
            if payloads:
                await conn.execute(
                    self._notify_sql(bool(blobs)), channels, payloads, *_blob_args(blob_ids, blobs)
                )
            return [None] * len(plan)
        # The version check rides along: if a stream appeared for one of these subjects, the
        # caller retries, storing it (its core frame, sent now, is not sent twice).
        row = await conn.fetchrow(
            self._notify_sql(bool(blobs), with_version=True), channels, payloads, *_blob_args(blob_ids, blobs)
        )
        notified.update(p.index for p in plan)
        if row is None or row[1] != version:  # the version this plan was routed with
            raise _Stale
        return [None] * len(plan)

    def _notify_sql(self, with_blobs: bool, *, with_version: bool = False) -> str:
        # NOTIFYs of one transaction are delivered in the order sent.
        sql = "SELECT (SELECT count(pg_notify(c, f)) FROM unnest($1::text[], $2::text[]) AS x(c, f))"
        if with_version:
            sql += f", (SELECT version FROM {self.names.meta})"
        if with_blobs:
            sql = (
                f"WITH b AS (INSERT INTO {self.names.blobs} (id, body) "
                "SELECT * FROM unnest($3::uuid[], $4::bytea[])) " + sql
            )
        return sql

    # -- storing -----------------------------------------------------------------------------------

    async def _write_fast(
        self, conn: asyncpg.Connection, plan: list[_Planned], notified: set[int]
    ) -> list[PubAck | None]:
        """One statement (its own transaction): counter, rows and NOTIFYs together."""
        entry = plan[0].entry
        assert entry is not None
        partition = plan[0].partition
        channels, payloads, _, _ = self._frames(plan, notified)
        base = new_id_base()
        first = await conn.fetchval(
            f"""WITH c AS (
                    UPDATE {self.names.partitions}
                    SET next_offset = next_offset + $3, bytes_written = bytes_written + $4
                    WHERE stream = $1 AND partition = $2 AND generation = $5
                    RETURNING next_offset - $3 AS first),
                i AS (
                    INSERT INTO {self.names.messages}
                        (stream, partition, "offset", subject, key, payload, headers, msg_id, explicit_id)
                    SELECT $1, $2, c.first + u.n - 1, u.subject, u.key, u.payload, u.headers::jsonb,
                           u.id, false
                    FROM c, unnest($6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[])
                        WITH ORDINALITY AS u(subject, key, payload, headers, id, n))
                SELECT c.first, (SELECT count(pg_notify(x.c, x.f))
                                 FROM unnest($11::text[], $12::text[]) AS x(c, f))
                FROM c""",
            entry.name,
            partition,
            len(plan),
            sum(len(p.item.payload) for p in plan),
            entry.generation,
            [p.item.subject for p in plan],
            [p.item.key for p in plan],
            [p.item.payload for p in plan],
            [headers_json(p.item.headers) for p in plan],
            [format_id(base + i) for i in range(len(plan))],
            channels,
            payloads,
        )
        if first is None:
            raise _Stale
        return [PubAck(entry.name, partition, first + i) for i in range(len(plan))]

    async def _write(
        self, conn: asyncpg.Connection, plan: list[_Planned], notified: set[int], version: int
    ) -> list[PubAck | None]:
        """The general path, inside a transaction: dedup, several partitions, blobs."""
        n = self.names
        unrouted = any(p.entry is None for p in plan)
        if unrouted and await conn.fetchval(f"SELECT version FROM {n.meta}") != version:
            raise _Stale
        await self._claim_ids(conn, plan)
        stored = [p for p in plan if p.entry is not None and not p.duplicate]
        groups: dict[tuple[str, int], list[_Planned]] = {}
        for p in stored:
            assert p.entry is not None
            groups.setdefault((p.entry.name, p.partition), []).append(p)
        for (name, partition), members in sorted(groups.items()):
            entry = members[0].entry
            assert entry is not None
            first = await conn.fetchval(
                f"""UPDATE {n.partitions}
                    SET next_offset = next_offset + $3, bytes_written = bytes_written + $4
                    WHERE stream = $1 AND partition = $2 AND generation = $5
                    RETURNING next_offset - $3""",
                name,
                partition,
                len(members),
                sum(len(p.item.payload) for p in members),
                entry.generation,
            )
            if first is None:
                raise _Stale
            for i, p in enumerate(members):
                p.offset = first + i
        if stored:
            base = new_id_base()
            await conn.execute(
                f"""INSERT INTO {n.messages}
                        (stream, partition, "offset", subject, key, payload, headers, msg_id, explicit_id)
                    SELECT s, p, o, subject, key, payload, headers::jsonb, id, explicit
                    FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[],
                                $7::text[], $8::text[], $9::bool[])
                        AS u(s, p, o, subject, key, payload, headers, id, explicit)""",
                [p.entry.name for p in stored if p.entry is not None],
                [p.partition for p in stored],
                [p.offset for p in stored],
                [p.item.subject for p in stored],
                [p.item.key for p in stored],
                [p.item.payload for p in stored],
                [headers_json(p.item.headers) for p in stored],
                [p.item.msg_id or format_id(base + i) for i, p in enumerate(stored)],
                [p.item.msg_id is not None for p in stored],
            )
            claimed = [p for p in stored if p.item.msg_id is not None]
            if claimed:
                await conn.execute(
                    f"""UPDATE {n.dedup} d SET partition = u.p, "offset" = u.o
                        FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[]) AS u(s, id, p, o)
                        WHERE d.stream = u.s AND d.msg_id = u.id""",
                    [p.entry.name for p in claimed if p.entry is not None],
                    [p.item.msg_id for p in claimed],
                    [p.partition for p in claimed],
                    [p.offset for p in claimed],
                )
        for p in plan:
            if p.duplicate_of is not None:
                p.partition, p.offset = plan[p.duplicate_of].partition, plan[p.duplicate_of].offset
        channels, payloads, blob_ids, blobs = self._frames(plan, notified)
        if payloads:
            await conn.execute(
                self._notify_sql(bool(blobs)), channels, payloads, *_blob_args(blob_ids, blobs)
            )
        return [
            None if p.entry is None else PubAck(p.entry.name, p.partition, p.offset, p.duplicate)
            for p in plan
        ]

    async def _claim_ids(self, conn: asyncpg.Connection, plan: list[_Planned]) -> None:
        """Dedup: claim each message id in its stream's window, or find the original."""
        first_of: dict[tuple[str, str], int] = {}
        claims: list[_Planned] = []
        for p in plan:
            if p.entry is None or p.item.msg_id is None:
                continue
            key = (p.entry.name, p.item.msg_id)
            if key in first_of:
                p.duplicate, p.duplicate_of = True, first_of[key]
            else:
                first_of[key] = p.index
                claims.append(p)
        claims.sort(key=lambda p: (p.entry.name if p.entry else "", p.item.msg_id or ""))
        for p in claims:
            assert p.entry is not None
            # A row older than the window is taken over; a newer one means a duplicate. A
            # concurrent publisher of the same id makes this wait for its commit.
            claimed = await conn.fetchval(
                f"""INSERT INTO {self.names.dedup} AS d (stream, msg_id, created_at) VALUES ($1, $2, now())
                    ON CONFLICT (stream, msg_id) DO UPDATE
                        SET created_at = excluded.created_at, partition = NULL, "offset" = NULL
                        WHERE d.created_at < now() - make_interval(secs => $3)
                    RETURNING true""",
                p.entry.name,
                p.item.msg_id,
                p.entry.spec.dedup_window_s,
            )
            if claimed:
                continue
            row = await conn.fetchrow(
                f'SELECT partition, "offset" FROM {self.names.dedup} WHERE stream = $1 AND msg_id = $2',
                p.entry.name,
                p.item.msg_id,
            )
            if row is not None and row["offset"] is not None:
                p.duplicate, p.partition, p.offset = True, row["partition"], row["offset"]


def _fast(plan: list[_Planned]) -> bool:
    first = plan[0]
    if first.entry is None:
        return False
    return all(
        p.entry is first.entry and p.partition == first.partition and p.item.msg_id is None for p in plan
    )


def _blob_args(blob_ids: list[uuid.UUID], blobs: list[bytes]) -> list[Any]:
    return [blob_ids, blobs] if blobs else []


# -- reading ------------------------------------------------------------------------------------------


async def read(
    conn: asyncpg.Connection, names: Names, stream: str, partition: int, start: int, limit: int
) -> list[Message]:
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS} FROM {names.messages}
            WHERE stream = $1 AND partition = $2 AND "offset" >= $3 ORDER BY "offset" LIMIT $4""",
        stream,
        partition,
        start,
        limit,
    )
    return [row_message(stream, row) for row in rows]


async def offset_for_time(
    conn: asyncpg.Connection, names: Names, stream: str, partition: int, timestamp: float
) -> int:
    """The first offset stored at or after ``timestamp`` (else the next offset), by binary
    search: within a partition ``created_at`` grows with the offset, since each write takes
    its time after acquiring the partition's lock (as long as the server clock does not step
    back)."""
    bounds = await conn.fetchrow(
        f"""SELECT (SELECT min("offset") FROM {names.messages} WHERE stream = $1 AND partition = $2) AS lo,
                   next_offset AS hi
            FROM {names.partitions} WHERE stream = $1 AND partition = $2""",
        stream,
        partition,
    )
    if bounds is None:
        raise StreamNotFoundError(f"no stream named {stream!r}")
    hi: int = bounds["hi"]
    lo: int = hi if bounds["lo"] is None else bounds["lo"]
    probe = f"""SELECT extract(epoch FROM created_at)::float8 FROM {names.messages}
                WHERE stream = $1 AND partition = $2 AND "offset" >= $3 ORDER BY "offset" LIMIT 1"""
    while lo < hi:
        mid = (lo + hi) // 2
        at = await conn.fetchval(probe, stream, partition, mid)
        if at is None or at >= timestamp:
            hi = mid
        else:
            lo = mid + 1
    return lo


async def resolve_start(
    conn: asyncpg.Connection, names: Names, stream: str, partitions: int, start: StartAt
) -> list[int]:
    if start.kind == "earliest":
        return [0] * partitions
    if start.kind == "offset":
        return [int(start.value)] * partitions
    if start.kind == "latest":
        rows = await conn.fetch(
            f"SELECT next_offset FROM {names.partitions} WHERE stream = $1 ORDER BY partition", stream
        )
        return [row["next_offset"] for row in rows]
    return [await offset_for_time(conn, names, stream, p, float(start.value)) for p in range(partitions)]


# -- retention ----------------------------------------------------------------------------------------


async def apply_retention(conn: asyncpg.Connection, names: Names, entry: StreamEntry) -> None:
    """Delete what the stream's limits no longer allow (each limit split evenly over the
    partitions), then the dedup ids older than the window."""
    spec = entry.spec
    rows = await conn.fetch(
        f"""SELECT p.partition, p.next_offset, p.bytes_written - p.bytes_deleted AS bytes,
                   (SELECT min("offset") FROM {names.messages} m
                    WHERE m.stream = p.stream AND m.partition = p.partition) AS first
            FROM {names.partitions} p WHERE p.stream = $1 AND p.generation = $2""",
        entry.name,
        entry.generation,
    )
    for row in rows:
        p, head = row["partition"], row["next_offset"]
        first = head if row["first"] is None else row["first"]
        cutoff = first
        if spec.max_msgs is not None:
            cutoff = max(cutoff, head - math.ceil(spec.max_msgs / spec.partitions))
        if spec.max_age_s is not None and cutoff < head:
            oldest = await conn.fetchval(
                f"""SELECT extract(epoch FROM now() - created_at)::float8 FROM {names.messages}
                    WHERE stream = $1 AND partition = $2 AND "offset" >= $3 ORDER BY "offset" LIMIT 1""",
                entry.name,
                p,
                cutoff,
            )
            if oldest is not None and oldest > spec.max_age_s:
                now = await conn.fetchval("SELECT extract(epoch FROM now())::float8")
                cutoff = max(cutoff, await offset_for_time(conn, names, entry.name, p, now - spec.max_age_s))
        if spec.max_bytes is not None and row["bytes"] > math.ceil(spec.max_bytes / spec.partitions):
            # The newest messages whose payloads fit in the share stay; the rest go.
            last_out = await conn.fetchval(
                f"""SELECT "offset" FROM (
                        SELECT "offset", sum(octet_length(payload)) OVER (ORDER BY "offset" DESC) AS tail
                        FROM {names.messages} WHERE stream = $1 AND partition = $2) t
                    WHERE tail > $3 ORDER BY "offset" DESC LIMIT 1""",
                entry.name,
                p,
                math.ceil(spec.max_bytes / spec.partitions),
            )
            if last_out is not None:
                cutoff = max(cutoff, last_out + 1)
        if cutoff > first:
            await delete_below(conn, names, entry, p, cutoff)
    await conn.execute(
        f"DELETE FROM {names.dedup} WHERE stream = $1 AND created_at < now() - make_interval(secs => $2)",
        entry.name,
        spec.dedup_window_s,
    )


async def delete_below(
    conn: asyncpg.Connection, names: Names, entry: StreamEntry, p: int, cutoff: int
) -> None:
    async with conn.transaction():
        # The counter row is locked last and briefly (the DELETE runs first): publishers wait
        # only for the byte count's update.
        await conn.execute(
            f"""WITH d AS (
                    DELETE FROM {names.messages} WHERE stream = $1 AND partition = $2 AND "offset" < $3
                    RETURNING octet_length(payload) AS size)
                UPDATE {names.partitions}
                SET bytes_deleted = bytes_deleted + (SELECT coalesce(sum(size), 0) FROM d)
                WHERE stream = $1 AND partition = $2 AND generation = $4""",
            entry.name,
            p,
            cutoff,
            entry.generation,
        )
        # Shared groups' deliveries of removed messages can no longer be delivered.
        await conn.execute(
            f"""DELETE FROM {names.deliveries}
                WHERE stream = $1 AND partition = $2 AND "offset" < $3 AND state = 'ready'""",
            entry.name,
            p,
            cutoff,
        )


def check_spec(spec: object) -> None:
    if not isinstance(spec, StreamSpec):
        raise InvalidConfigError(f"create_stream takes a StreamSpec, not {type(spec).__name__}")
    for name in ("max_msgs", "max_bytes"):
        value = getattr(spec, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidConfigError(f"stream {spec.name!r}: {name} must be a positive integer or None")
    for name, minimum in (("max_age_s", 0.0), ("dedup_window_s", 0.0)):
        value = getattr(spec, name)
        if value is None and name == "max_age_s":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidConfigError(f"stream {spec.name!r}: {name} must be a number of seconds")
        if value < minimum or (name == "max_age_s" and value == 0):
            raise InvalidConfigError(f"stream {spec.name!r}: {name} must be positive")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
