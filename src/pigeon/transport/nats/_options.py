"""The NATS transport's options, and the names of every JetStream object and subject it uses."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

from ...engine.config import validate_name
from ...errors import InvalidConfigError, InvalidNameError

# Subjects under this root carry pigeon's own traffic: the stored copies of partitioned
# streams (``$PGN.<stream>.<p>.<subject>``). Users may not publish there.
PARTITION_ROOT = "$PGN"
# Notifications between the members of an ordered group (``$PGNC.<stream>.<group>``), and
# to every member of a stream's groups that it was purged (``$PGNC.<stream>``).
COORDINATION_ROOT = "$PGNC"
# Reply subjects of stored publishes: recognisable, so core subscribers are not shown a
# JetStream acknowledgement inbox as a request to answer.
ACK_INBOX_ROOT = "_INBOX.pgnack"
DEAD_LETTER_ROOT = "$DLQ"
# Subjects users may not publish to.
RESERVED_ROOTS = (f"{PARTITION_ROOT}.", f"{COORDINATION_ROOT}.", f"{ACK_INBOX_ROOT}.")

STREAM_DESCRIPTION = "pigeon-stream:"
GROUP_DESCRIPTION = "pigeon-group:"


@dataclass(frozen=True)
class NatsOptions:
    """Settings of the NATS transport (``nats://host:port``; user, password or token in the URL).

    ``request_timeout_s`` bounds JetStream API calls and publish acknowledgements.
    ``storage`` and ``replicas`` apply to the streams this transport creates. A subject's
    capturing stream is looked up once and cached for ``route_cache_s`` (a stream created or
    deleted by another process is noticed within that time). Ordered groups keep a member's
    partitions while it heartbeats every ``heartbeat_interval_s``; a member silent for
    ``session_timeout_s`` loses them (the value of the first member of a group is kept in
    its coordination bucket). Core subscriptions buffer ``subscription_buffer`` messages.
    """

    name: str = "pigeon"
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    # Between reconnect attempts to the same server: short, so a restarted broker is back soon.
    reconnect_wait_s: float = 0.25
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    route_cache_s: float = 2.0
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    subscription_buffer: int = 65536
    user_credentials: str | None = None
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidConfigError(f"name must be non-empty text, not {self.name!r}")
        for field in (
            "connect_timeout_s",
            "request_timeout_s",
            "route_cache_s",
            "session_timeout_s",
            "heartbeat_interval_s",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(f"{field} must be a positive number, not {value!r}")
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise InvalidConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most a third of "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        if self.storage not in ("file", "memory"):
            raise InvalidConfigError(f"storage must be 'file' or 'memory', not {self.storage!r}")
        for field in ("replicas", "subscription_buffer"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{field} must be a positive integer, not {value!r}")
        if self.user_credentials is not None and not isinstance(self.user_credentials, str):
            raise InvalidConfigError("user_credentials must be the path of a .creds file")
        if self.tls is not None and not isinstance(self.tls, ssl.SSLContext):
            raise InvalidConfigError("tls must be an ssl.SSLContext")


@dataclass(frozen=True)
class Layout:
    """A pigeon stream on JetStream: its partitions' streams and their stored-subject prefixes."""

    name: str
    partitions: int
    subjects: tuple[str, ...]
    streams: tuple[str, ...]
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, name: str, partitions: int, subjects: tuple[str, ...]) -> Layout:
        return cls(
            name,
            partitions,
            subjects,
            tuple(partition_stream(name, partitions, p) for p in range(partitions)),
            tuple(partition_subject_prefix(name, p) for p in range(partitions)),
        )


def partition_stream(stream: str, partitions: int, p: int) -> str:
    """The JetStream stream holding partition ``p``: the stream itself when it has one partition.

    ``~`` cannot appear in a pigeon name, so these never collide with a user's stream.
    """
    return stream if partitions == 1 else f"{stream}~{p}"


def partition_subject_prefix(stream: str, p: int) -> str:
    return f"{PARTITION_ROOT}.{stream}.{p}."


def dead_letter_stream_name(stream: str, group: str) -> str:
    name = f"{stream}-{group}-dlq"
    try:
        validate_name(name)
    except InvalidNameError:
        raise InvalidNameError(
            f"group {group!r} on stream {stream!r}: the dead-letter stream name {name!r} would "
            "exceed 64 characters; use shorter names or dead_letter=False"
        ) from None
    return name


def dead_letter_subject(stream: str, group: str) -> str:
    return f"{DEAD_LETTER_ROOT}.{stream}.{group}"


def coordination_bucket(stream: str, group: str) -> str:
    """The KV bucket of an ordered group. The length prefix keeps ("a_b", "c") and
    ("a", "b_c") apart, since both names may contain '_'."""
    return f"PGN{len(stream)}_{stream}_{group}"


def coordination_subject(stream: str, group: str) -> str:
    return f"{COORDINATION_ROOT}.{stream}.{group}"


def purge_subject(stream: str) -> str:
    return f"{COORDINATION_ROOT}.{stream}"
