"""The tables of the PostgreSQL transport, created on open when missing.

Offsets are the ``"offset"`` columns: 0-based and dense per partition, handed out by the
partition's counter row (``partitions.next_offset``) under its row lock, so that writers to
one partition commit in offset order. No foreign keys on the hot tables: a foreign-key check
share-locks the referenced row on every insert, which would make every publisher of a stream
contend on its ``streams`` row; deleting a stream deletes its rows explicitly instead.
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

from ._options import Names


def ddl(n: Names) -> list[str]:
    return [
        f"CREATE SCHEMA IF NOT EXISTS {n.quoted_schema}",
        # One row: bumped on every stream creation or deletion, so publishers can tell that
        # their cached routes are stale.
        f"""CREATE TABLE IF NOT EXISTS {n.meta} (
            id int PRIMARY KEY CHECK (id = 1),
            version bigint NOT NULL)""",
        f"INSERT INTO {n.meta} (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        f"CREATE SEQUENCE IF NOT EXISTS {n.generation_seq}",
        f"CREATE SEQUENCE IF NOT EXISTS {n.member_seq}",
        f"""CREATE TABLE IF NOT EXISTS {n.streams} (
            name text PRIMARY KEY,
            generation bigint NOT NULL,
            subjects text[] NOT NULL,
            partitions int NOT NULL,
            max_age_s float8,
            max_msgs bigint,
            max_bytes bigint,
            dedup_window_s float8 NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now())""",
        # The counter rows: locked by every write to the partition until it commits.
        f"""CREATE TABLE IF NOT EXISTS {n.partitions} (
            stream text NOT NULL,
            partition int NOT NULL,
            generation bigint NOT NULL,
            next_offset bigint NOT NULL DEFAULT 0,
            bytes_written bigint NOT NULL DEFAULT 0,
            bytes_deleted bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (stream, partition))""",
        f"""CREATE TABLE IF NOT EXISTS {n.messages} (
            stream text NOT NULL,
            partition int NOT NULL,
            "offset" bigint NOT NULL,
            subject text NOT NULL,
            key text,
            payload bytea NOT NULL,
            headers jsonb,
            msg_id text NOT NULL,
            explicit_id boolean NOT NULL,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (stream, partition, "offset"))""",
        f"""CREATE TABLE IF NOT EXISTS {n.dedup} (
            stream text NOT NULL,
            msg_id text NOT NULL,
            partition int,
            "offset" bigint,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (stream, msg_id))""",
        f"""CREATE TABLE IF NOT EXISTS {n.groups} (
            stream text NOT NULL,
            name text NOT NULL,
            kind text NOT NULL,
            spec jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream, name))""",
        # Shared groups: the next offset of each partition not yet handed to the group...
        f"""CREATE TABLE IF NOT EXISTS {n.cursors} (
            stream text NOT NULL,
            grp text NOT NULL,
            partition int NOT NULL,
            next_offset bigint NOT NULL,
            PRIMARY KEY (stream, grp, partition))""",
        # ... and one row per message handed out and not finished (an ack deletes it).
        # state 'leased': held by member until leased_until; 'ready': to deliver again once
        # not_before has passed (delivery_count 0: parked behind its key, key_ordered).
        f"""CREATE TABLE IF NOT EXISTS {n.deliveries} (
            stream text NOT NULL,
            grp text NOT NULL,
            partition int NOT NULL,
            "offset" bigint NOT NULL,
            key text,
            state text NOT NULL,
            delivery_count int NOT NULL,
            lease bigint,
            member text,
            leased_until timestamptz,
            not_before timestamptz NOT NULL DEFAULT '-infinity',
            first_failure_at float8,
            last_failure_at float8,
            error_type text,
            error_message text,
            PRIMARY KEY (stream, grp, partition, "offset"))""",
        # Ordered groups: per partition the committed offset, its owner and the owner's
        # heartbeat expiry, a pause after a delayed nack, and durable delivery counts.
        f"""CREATE TABLE IF NOT EXISTS {n.group_partitions} (
            stream text NOT NULL,
            grp text NOT NULL,
            partition int NOT NULL,
            committed bigint NOT NULL,
            owner text,
            owner_name text,
            owner_expires timestamptz,
            paused_until timestamptz,
            delivered_upto bigint NOT NULL,
            redelivered jsonb NOT NULL DEFAULT '{{}}',
            PRIMARY KEY (stream, grp, partition))""",
        f"""CREATE TABLE IF NOT EXISTS {n.members} (
            stream text NOT NULL,
            grp text NOT NULL,
            member text NOT NULL,
            name text NOT NULL,
            joined bigint NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (stream, grp, member))""",
        # Ordered groups: what went wrong with a message so far, for its dead letter.
        f"""CREATE TABLE IF NOT EXISTS {n.failures} (
            stream text NOT NULL,
            grp text NOT NULL,
            partition int NOT NULL,
            "offset" bigint NOT NULL,
            first_at float8 NOT NULL,
            last_at float8 NOT NULL,
            error_type text NOT NULL,
            error_message text NOT NULL,
            PRIMARY KEY (stream, grp, partition, "offset"))""",
        # Core subscriptions, so that publishers know whom a subject interests; pid is the
        # backend of the subscriber's LISTEN connection (a row whose pid is gone is stale).
        f"""CREATE TABLE IF NOT EXISTS {n.interest} (
            subscription text PRIMARY KEY,
            pid int NOT NULL,
            pattern text NOT NULL,
            queue text)""",
        f"""CREATE TABLE IF NOT EXISTS {n.blobs} (
            id uuid PRIMARY KEY,
            body bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now())""",
    ]


async def ensure_schema(conn: asyncpg.Connection, names: Names) -> None:
    """Create what is missing. Serialized by an advisory lock: concurrent ``CREATE ... IF NOT
    EXISTS`` statements can still collide on the catalogs' unique indexes."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", names.ddl_lock)
        for statement in ddl(names):
            await conn.execute(statement)


async def drop_schema(conn: asyncpg.Connection, names: Names) -> None:
    await conn.execute(f"DROP SCHEMA IF EXISTS {names.quoted_schema} CASCADE")
