"""The PostgreSQL transport's options and the names of everything it creates in the database."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...engine.config import DEFAULT_MAX_MESSAGE_BYTES
from ...errors import InvalidConfigError

# Lower-case so it never needs quoting by people reading the tables, and short enough that
# "<schema>:core" stays within PostgreSQL's 63-byte limit on channel names.
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,47}")


@dataclass(frozen=True)
class PostgresOptions:
    """Settings of the PostgreSQL transport (``postgresql://user@host:port/database``).

    ``schema`` holds every table pigeon uses (created on open when missing), so several
    deployments can share one database. ``pool_size`` bounds the connections of the pool
    (one more is kept for LISTEN). An idle consumer is woken by NOTIFY; without one it looks
    again every ``poll_interval_s`` (a lost notification costs at most that much latency).
    Ordered-group members keep their partitions while they heartbeat every
    ``heartbeat_interval_s``; one silent for ``session_timeout_s`` loses them. Retention,
    dedup-window pruning and clean-ups run every ``maintenance_interval_s``. Core messages
    too large for a NOTIFY are passed by reference through a table and kept there
    ``core_blob_ttl_s``. Core subscriptions buffer ``subscription_buffer`` messages each,
    then drop the oldest (counted and logged).

    ``durable_acks`` False (the default) commits what consumers do (claims, acks, nacks,
    commits of ordered groups, dead letters) with ``synchronous_commit = off``, on a second
    pool of up to ``pool_size`` connections: such a commit does not wait for its WAL flush,
    so a server crash can forget the last fraction of a second of them, and those messages
    are delivered again (at least once still holds; publishes always wait for the flush).
    True makes every settlement wait for the flush, at the cost of a disk flush per ack.
    """

    schema: str = "pigeon"
    pool_size: int = 10
    pool_min_size: int = 1
    poll_interval_s: float = 1.0
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    maintenance_interval_s: float = 5.0
    core_blob_ttl_s: float = 60.0
    subscription_buffer: int = 10_000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    connect_timeout_s: float = 10.0
    durable_acks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.schema, str) or not _SCHEMA.fullmatch(self.schema):
            raise InvalidConfigError(
                f"schema must be 1 to 48 lower-case letters, digits or '_' (not starting with a "
                f"digit), not {self.schema!r}"
            )
        for name in ("pool_size", "pool_min_size", "subscription_buffer", "max_message_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}")
        if self.pool_min_size > self.pool_size:
            raise InvalidConfigError(
                f"pool_min_size ({self.pool_min_size}) must not exceed pool_size ({self.pool_size})"
            )
        for name in (
            "poll_interval_s",
            "session_timeout_s",
            "heartbeat_interval_s",
            "maintenance_interval_s",
            "core_blob_ttl_s",
            "connect_timeout_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(f"{name} must be a positive number, not {value!r}")
        if not isinstance(self.durable_acks, bool):
            raise InvalidConfigError(f"durable_acks must be a bool, not {self.durable_acks!r}")
        if self.heartbeat_interval_s * 2 > self.session_timeout_s:
            raise InvalidConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"session_timeout_s ({self.session_timeout_s})"
            )


class Names:
    """Schema-qualified table names and the NOTIFY channels of one schema."""

    def __init__(self, schema: str) -> None:
        q = f'"{schema}"'
        self.schema = schema
        self.quoted_schema = q
        self.meta = f"{q}.meta"
        self.streams = f"{q}.streams"
        self.partitions = f"{q}.partitions"
        self.messages = f"{q}.messages"
        self.dedup = f"{q}.dedup"
        self.groups = f"{q}.groups"
        self.cursors = f"{q}.cursors"
        self.deliveries = f"{q}.deliveries"
        self.group_partitions = f"{q}.group_partitions"
        self.members = f"{q}.members"
        self.failures = f"{q}.failures"
        self.interest = f"{q}.core_interest"
        self.blobs = f"{q}.core_blobs"
        self.member_seq = f"{q}.member_seq"
        self.generation_seq = f"{q}.generation_seq"
        # Channels: wake-ups (payload: a stream name), registry changes, core messages.
        self.data_channel = f"{schema}:data"
        self.control_channel = f"{schema}:ctl"
        self.core_channel = f"{schema}:core"
        # Advisory lock keys (hashed with hashtext): the DDL, the stream registry, maintenance.
        self.ddl_lock = f"pigeon:{schema}:ddl"
        self.registry_lock = f"pigeon:{schema}:registry"
        self.maintenance_lock = f"pigeon:{schema}:maintenance"
