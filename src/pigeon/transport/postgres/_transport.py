"""`PostgresTransport`: streams, groups and core messaging on PostgreSQL (see the package docs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from ...engine.config import validate_name
from ...engine.stream import PubAck
from ...errors import (
    GroupNotFoundError,
    InvalidConfigError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
)
from ...message import Message
from ...subjects import patterns_overlap, validate_subject
from ..base import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    PartitionLag,
    StreamSpec,
    StreamState,
    Subscription,
    Transport,
)
from ._codec import MESSAGE_COLUMNS, Outgoing, check_message, row_message
from ._core import Core
from ._groups import GroupConsumer, GroupContext, dead_letter_name, ensure_group, ordered_lag, shared_lag
from ._options import Names, PostgresOptions
from ._ordered import OrderedConsumer
from ._schema import ensure_schema
from ._shared import SharedConsumer
from ._streams import (
    Registry,
    StreamEntry,
    Writer,
    apply_retention,
    check_spec,
    delete_below,
    spec_from_row,
)

log = logging.getLogger("pigeon.transport.postgres")

_EMULATED = (
    "wildcards",
    "queue_groups",
    "request_reply",
    "partitions",
    "ordered_groups",
    "shared_groups",
    "per_key_order",
    "delayed_nack",
    "ack_timeout",
    "in_progress",
    "max_deliver",
    "dead_letters",
    "dedup",
    "replay_offset",
    "replay_time",
    "lag",
)

CAPABILITIES = Capabilities(
    durable=True,
    wildcards=True,
    queue_groups=True,
    request_reply=True,
    no_responders=False,
    partitions=True,
    ordered_groups=True,
    shared_groups=True,
    per_key_order=True,
    delayed_nack=True,
    ack_timeout=True,
    in_progress=True,
    max_deliver=True,
    dead_letters=True,
    dedup=True,
    replay_offset=True,
    replay_time=True,
    lag=True,
    emulated=frozenset(_EMULATED),
)


class PostgresTransport(Transport):
    """Pigeon on PostgreSQL 12+ with asyncpg (see the package docstring for the design)."""

    name = "postgres"
    capabilities = CAPABILITIES
    emulation_notes: ClassVar[dict[str, str]] = {
        "wildcards": "every core message is one NOTIFY on one channel; subscribers match subjects locally",
        "queue_groups": "subscriptions are registered in a table; the publisher names one member "
        "of each matching queue group (in turn) in the NOTIFY",
        "request_reply": "an inbox subject per request, always NOTIFYed; a request nobody answers "
        "times out (NOTIFY cannot tell that nobody listens)",
        "partitions": "a counter row per partition hands out dense offsets under its row lock, "
        "so writers commit in offset order",
        "ordered_groups": "a table of partitions with committed offset, owner and heartbeat "
        "expiry; member i of n live members owns the partitions p % n == i",
        "shared_groups": "a table of deliveries (lease token, leased_until, not_before) claimed "
        "with FOR UPDATE SKIP LOCKED; new messages are taken from per-partition cursors",
        "per_key_order": "ordered groups; key_ordered shared groups park a message while an "
        "earlier one of its key is unfinished",
        "delayed_nack": "the delivery row's not_before",
        "ack_timeout": "the delivery row's leased_until; expired rows are claimed again",
        "in_progress": "leased_until is pushed back by ack_wait_s",
        "max_deliver": "delivery counts in the delivery rows (shared) or the partition rows (ordered)",
        "dead_letters": "the stream <stream>-<group>-dlq, written in the same transaction that "
        "removes the message from the group",
        "dedup": "a table of (stream, msg_id) claimed with INSERT ON CONFLICT, pruned after the window",
        "replay_offset": "a group's cursors start at the offset",
        "replay_time": "binary search over created_at, which grows with the offset in a partition",
        "lag": "head (the counter) minus the committed offset, from the group tables",
    }

    def __init__(
        self, pool: asyncpg.Pool, group_pool: asyncpg.Pool, url: str, options: PostgresOptions
    ) -> None:
        self.options = options
        self.names = Names(options.schema)
        self.pool = pool
        self.group_pool = group_pool
        self.registry = Registry(self.names)
        self.core = Core(pool, url, self.names, options, self._streams_changed)
        self.writer = Writer(pool, self.names, self.registry, self.core)
        self.ctx = GroupContext(
            pool, group_pool, self.names, options, self.writer, self.core, self.ensure_stream
        )
        self._consumers: weakref.WeakSet[GroupConsumer] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, options: Any = None) -> PostgresTransport:
        if options is None:
            options = PostgresOptions()
        elif not isinstance(options, PostgresOptions):
            raise InvalidConfigError(f"options must be a PostgresOptions, not {type(options).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise InvalidConfigError(f"not a PostgreSQL URL: {url!r} (use postgresql://user@host:port/db)")
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"  # no password
        settings = {"application_name": "pigeon"}
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=options.pool_min_size,
                max_size=options.pool_size,
                timeout=options.connect_timeout_s,
                server_settings=settings,
            )
        except (
            ValueError,
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidPasswordError,
        ) as exc:
            raise InvalidConfigError(f"cannot open PostgreSQL at {where}: {exc}") from None
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError) as exc:
            raise TransportClosedError(f"cannot reach PostgreSQL at {where}: {exc}") from None
        group_pool = pool
        try:
            if not options.durable_acks:
                group_pool = await asyncpg.create_pool(
                    url,
                    min_size=options.pool_min_size,
                    max_size=options.pool_size,
                    timeout=options.connect_timeout_s,
                    server_settings={**settings, "synchronous_commit": "off"},
                )
        except BaseException:
            await pool.close()
            raise
        transport = cls(pool, group_pool, url, options)
        try:
            async with pool.acquire() as conn:
                await ensure_schema(conn, transport.names)
                await transport.registry.load(conn)
            await transport.core.start()
        except BaseException:
            await transport.core.close()
            await transport._close_pools()
            raise
        transport._maintenance = asyncio.get_running_loop().create_task(transport._maintain_forever())
        return transport

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *([self._maintenance] if self._maintenance else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in list(self._consumers):
            with contextlib.suppress(Exception):
                await consumer.close()
        await self.core.close()
        await self._close_pools()

    async def _close_pools(self) -> None:
        for pool in {id(self.pool): self.pool, id(self.group_pool): self.group_pool}.values():
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    def _streams_changed(self) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        try:
            await self.writer.reload()
        except Exception as exc:  # the next publish finds out and retries
            log.warning("reloading the stream registry failed: %s", exc)

    # -- publishing ----------------------------------------------------------------------------------

    def _outgoing(
        self,
        subject: str,
        payload: bytes,
        key: str | None,
        headers: Mapping[str, str] | None,
        msg_id: str | None,
    ) -> Outgoing:
        validate_subject(subject)
        checked = check_message(payload, key, headers, msg_id, self.options.max_message_bytes)
        return Outgoing(subject, payload, key=key, headers=checked, msg_id=msg_id)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        item = self._outgoing(subject, payload, key, headers, msg_id)
        return (await self.writer.publish(None, [item]))[0]

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        """Publish in one transaction: all stored or none (offsets in order within a partition)."""
        items = [
            self._outgoing(m.subject, m.payload, m.key, m._headers, m.id if m.has_explicit_id else None)
            for m in messages
        ]
        return await self.writer.publish(None, items) if items else []

    async def publish_in(
        self,
        connection: asyncpg.Connection,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Publish inside the caller's transaction on ``connection`` (a transactional outbox):
        stored, and announced to core subscribers, only if that transaction commits. Other
        writers to the same partition wait for it to end."""
        item = self._outgoing(subject, payload, key, headers, msg_id)
        return (await self.writer.publish(connection, [item]))[0]

    # -- core messaging ------------------------------------------------------------------------------------

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        return await self.core.subscribe(pattern, queue)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        item = self._outgoing(subject, payload, None, headers, None)

        async def send(inbox: str) -> None:
            item.reply_to = inbox
            await self.writer.publish(None, [item], store=False)

        return await self.core.request(subject, send, timeout)

    # -- streams -------------------------------------------------------------------------------------------

    async def create_stream(self, spec: StreamSpec) -> None:
        await self._create_stream(spec, exists_ok=False)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream unless one with that name exists (whatever its configuration)."""
        await self._create_stream(spec, exists_ok=True)

    async def _create_stream(self, spec: StreamSpec, *, exists_ok: bool) -> None:
        self.core.check_open()
        check_spec(spec)
        n = self.names
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", n.registry_lock)
            rows = await conn.fetch(f"SELECT * FROM {n.streams}")
            for row in rows:
                if row["name"] != spec.name:
                    continue
                if exists_ok or spec_from_row(row) == spec:
                    return
                raise StreamExistsError(f"stream {spec.name!r} exists with a different configuration")
            for row in rows:
                for mine in spec.subjects:
                    for theirs in row["subjects"]:
                        if patterns_overlap(mine, theirs):
                            raise SubjectOverlapError(
                                f"stream {spec.name!r} subject {mine!r} overlaps {theirs!r} "
                                f"of stream {row['name']!r}"
                            )
            generation = await conn.fetchval(
                f"""INSERT INTO {n.streams}
                        (name, generation, subjects, partitions, max_age_s, max_msgs, max_bytes,
                         dedup_window_s)
                    VALUES ($1, nextval('{n.generation_seq}'), $2, $3, $4, $5, $6, $7)
                    RETURNING generation""",
                spec.name,
                list(spec.subjects),
                spec.partitions,
                spec.max_age_s,
                spec.max_msgs,
                spec.max_bytes,
                spec.dedup_window_s,
            )
            await conn.execute(
                f"""INSERT INTO {n.partitions} (stream, partition, generation)
                    SELECT $1, p, $2 FROM generate_series(0, $3 - 1) AS p""",
                spec.name,
                generation,
                spec.partitions,
            )
            await self._registry_changed(conn)
        await self.writer.reload()

    async def _registry_changed(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            f"""WITH u AS (UPDATE {self.names.meta} SET version = version + 1)
                SELECT pg_notify($1, '{{"t":"streams"}}')""",
            self.names.control_channel,
        )

    async def delete_stream(self, name: str) -> None:
        """Delete the stream, its messages, its groups and their dead-letter streams."""
        self.core.check_open()
        validate_name(name)
        n = self.names
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", n.registry_lock)
            if not await conn.fetchval(f"SELECT true FROM {n.streams} WHERE name = $1", name):
                raise StreamNotFoundError(f"no stream named {name!r}")
            todo, deleted = [name], []
            while todo:
                current = todo.pop()
                deleted.append(current)
                await self._delete_rows(conn, current)
                # Its groups' dead-letter streams: those capturing $DLQ.<stream>.<group> and
                # named after it (the groups themselves may be gone already).
                prefix = f"$DLQ.{current}."
                for row in await conn.fetch(
                    f"""SELECT name, subjects FROM {n.streams}
                        WHERE cardinality(subjects) = 1 AND starts_with(subjects[1], $1)""",
                    prefix,
                ):
                    group = row["subjects"][0][len(prefix) :]
                    if row["name"] == f"{current}-{group}-dlq" and row["name"] not in deleted:
                        todo.append(row["name"])
            await self._registry_changed(conn)
            await conn.execute("SELECT pg_notify($1, s) FROM unnest($2::text[]) s", n.data_channel, deleted)
        await self.writer.reload()

    async def _delete_rows(self, conn: asyncpg.Connection, name: str) -> None:
        n = self.names
        # Groups first: their KEY SHARE locks make this wait for fetches in progress. Then the
        # counter rows: this waits for publishes in progress, whose rows the next DELETE sees.
        for table in (n.groups, n.streams, n.partitions, n.messages, n.dedup):
            column = "name" if table == n.streams else "stream"
            await conn.execute(f"DELETE FROM {table} WHERE {column} = $1", name)
        for table in (n.cursors, n.deliveries, n.group_partitions, n.members, n.failures):
            await conn.execute(f"DELETE FROM {table} WHERE stream = $1", name)

    async def _entry(self, conn: asyncpg.Connection, name: str) -> StreamEntry:
        validate_name(name)
        row = await conn.fetchrow(f"SELECT * FROM {self.names.streams} WHERE name = $1", name)
        if row is None:
            raise StreamNotFoundError(f"no stream named {name!r}")
        return StreamEntry(row["name"], row["generation"], spec_from_row(row))

    async def stream_state(self, name: str) -> StreamState:
        """The stream now; its retention limits are applied first, so the count honours them."""
        self.core.check_open()
        n = self.names
        async with self.pool.acquire() as conn:
            entry = await self._entry(conn, name)
            if entry.spec.max_age_s or entry.spec.max_msgs or entry.spec.max_bytes:
                await apply_retention(conn, n, entry)
            rows = await conn.fetch(
                f"""SELECT p.next_offset, (SELECT min("offset") FROM {n.messages} m
                                           WHERE m.stream = p.stream AND m.partition = p.partition) AS first
                    FROM {n.partitions} p WHERE p.stream = $1 ORDER BY p.partition""",
                name,
            )
        # Offsets are dense and retention removes the oldest: a partition holds first..next-1.
        messages = sum(
            r["next_offset"] - (r["next_offset"] if r["first"] is None else r["first"]) for r in rows
        )
        return StreamState(
            name=name,
            subjects=entry.spec.subjects,
            partitions=entry.spec.partitions,
            messages=messages,
            last_offsets=tuple(r["next_offset"] - 1 for r in rows),
        )

    async def list_streams(self) -> list[str]:
        self.core.check_open()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT name FROM {self.names.streams}")
        return sorted(row["name"] for row in rows)

    async def purge_stream(self, name: str) -> None:
        """Delete every message below each partition's counter, as retention would: groups
        skip the gap (cursors and committed offsets stay), rows held by a member stay until
        it settles them, and a nacked or expired one finds its message gone and is dropped."""
        self.core.check_open()
        n = self.names
        async with self.pool.acquire() as conn, conn.transaction():
            entry = await self._entry(conn, name)
            # One transaction: the partitions are purged together or not at all. A publish
            # committed before the counters are read is removed; one that commits later stays.
            heads = await conn.fetch(
                f"SELECT partition, next_offset FROM {n.partitions} WHERE stream = $1 AND generation = $2",
                name,
                entry.generation,
            )
            for row in heads:
                await delete_below(conn, n, entry, row["partition"], row["next_offset"])
            # Parked rows of key_ordered groups were deleted: their keys are free.
            await conn.execute("SELECT pg_notify($1, $2)", n.data_channel, name)

    # -- groups --------------------------------------------------------------------------------------

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        self.core.check_open()
        validate_name(stream)
        if not isinstance(spec, ConsumerSpec):
            raise InvalidConfigError(f"consumer takes a ConsumerSpec, not {type(spec).__name__}")
        if member is not None and (not isinstance(member, str) or not member or "\x00" in member):
            raise InvalidConfigError(f"member name must be non-empty text, not {member!r}")
        partitions = await ensure_group(self.ctx, stream, spec)
        name = member or f"member-{len(self._consumers) + 1}"
        consumer: GroupConsumer
        if spec.kind == "ordered":
            ordered = OrderedConsumer(self.ctx, stream, spec, name, partitions)
            await ordered.join()
            consumer = ordered
        else:
            consumer = SharedConsumer(self.ctx, stream, spec, name, partitions)
        self._consumers.add(consumer)
        return consumer

    async def delete_group(self, stream: str, group: str) -> None:
        """Delete the group and its state; its dead-letter stream stays (delete it by name)."""
        self.core.check_open()
        n = self.names
        async with self.pool.acquire() as conn, conn.transaction():
            await self._group_kind(conn, stream, group)
            await conn.execute(f"DELETE FROM {n.groups} WHERE stream = $1 AND name = $2", stream, group)
            for table in (n.cursors, n.deliveries, n.group_partitions, n.members, n.failures):
                await conn.execute(f"DELETE FROM {table} WHERE stream = $1 AND grp = $2", stream, group)
            await conn.execute("SELECT pg_notify($1, $2)", n.data_channel, stream)

    async def _group_kind(self, conn: asyncpg.Connection, stream: str, group: str) -> str:
        await self._entry(conn, stream)
        validate_name(group, "group")
        kind = await conn.fetchval(
            f"SELECT kind FROM {self.names.groups} WHERE stream = $1 AND name = $2", stream, group
        )
        if kind is None:
            raise GroupNotFoundError(f"no group {group!r} on stream {stream!r}")
        return str(kind)

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        self.core.check_open()
        n = self.names
        first = f"""(SELECT min("offset") FROM {n.messages} m
                     WHERE m.stream = p.stream AND m.partition = p.partition)"""
        async with self.pool.acquire() as conn:
            if await self._group_kind(conn, stream, group) == "ordered":
                rows = await conn.fetch(
                    f"""SELECT g.partition, p.next_offset AS head, {first} AS first, g.committed,
                               g.delivered_upto, g.owner_name,
                               coalesce(g.owner_expires > now(), false) AS live
                        FROM {n.group_partitions} g JOIN {n.partitions} p
                            ON p.stream = g.stream AND p.partition = g.partition
                        WHERE g.stream = $1 AND g.grp = $2 ORDER BY g.partition""",
                    stream,
                    group,
                )
                return [ordered_lag(r) for r in rows]
            rows = await conn.fetch(
                f"""SELECT c.partition, p.next_offset AS head, {first} AS first, c.next_offset AS cursor,
                           d.lowest, coalesce(d.rows, 0) AS rows, coalesce(d.leased, 0) AS leased,
                           coalesce(d.parked, 0) AS parked
                    FROM {n.cursors} c
                    JOIN {n.partitions} p ON p.stream = c.stream AND p.partition = c.partition
                    LEFT JOIN LATERAL (
                        SELECT min("offset") AS lowest, count(*) AS rows,
                               count(*) FILTER (WHERE state = 'leased' AND leased_until > now()) AS leased,
                               count(*) FILTER (WHERE delivery_count = 0) AS parked
                        FROM {n.deliveries} d
                        WHERE d.stream = c.stream AND d.grp = c.grp AND d.partition = c.partition) d ON true
                    WHERE c.stream = $1 AND c.grp = $2 ORDER BY c.partition""",
                stream,
                group,
            )
            return [shared_lag(r) for r in rows]

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        self.core.check_open()
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        validate_name(group, "group")
        name = dead_letter_name(stream, group)
        async with self.pool.acquire() as conn:
            await self._entry(conn, stream)
            rows = await conn.fetch(
                f"""SELECT {MESSAGE_COLUMNS} FROM {self.names.messages}
                    WHERE stream = $1 ORDER BY partition, "offset" LIMIT $2""",
                name,
                max_messages,
            )
        return [row_message(name, row) for row in rows]

    # -- maintenance ----------------------------------------------------------------------------------

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.maintenance_interval_s)
            try:
                await self.maintain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "PostgreSQL maintenance failed (tried again in %ss): %s",
                    self.options.maintenance_interval_s,
                    exc,
                )

    async def maintain(self) -> None:
        """Apply retention, prune dedup ids, expired core blobs and stale registrations now.

        Runs every ``maintenance_interval_s`` anyway; one process at a time does it (an
        advisory lock), the others skip their turn.
        """
        self.core.check_open()
        n = self.names
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", n.maintenance_lock):
                return
            try:
                for entry in list(self.registry.streams.values()):
                    await apply_retention(conn, n, entry)
                await conn.execute(
                    f"DELETE FROM {n.blobs} WHERE created_at < now() - make_interval(secs => $1)",
                    self.options.core_blob_ttl_s,
                )
                # Subscriptions whose LISTEN connection is gone (a process that died).
                await conn.execute(
                    f"""WITH d AS (
                            DELETE FROM {n.interest} WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)
                            RETURNING subscription)
                        SELECT pg_notify($1, json_build_object('t', '-', 'id', subscription)::text) FROM d""",
                    n.control_channel,
                )
                await conn.execute(
                    f"DELETE FROM {n.members} WHERE expires_at < now() - make_interval(secs => $1)",
                    self.options.session_timeout_s * 10,
                )
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", n.maintenance_lock)


__all__ = ["CAPABILITIES", "PostgresTransport"]
