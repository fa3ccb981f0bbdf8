"""The RabbitMQ transport's options, and the names of every exchange and queue it uses."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import InvalidConfigError

# Retry levels: a nack delay of d ms waits in the level queue 2**k >= d (k = 0..35, up to
# about a year), each message with its own expiration. Messages of one level differ by at
# most a factor of two, so head-of-line blocking can at most double a wait.
LEVELS = 36


@dataclass(frozen=True)
class RabbitMQOptions:
    """Settings of the RabbitMQ transport (``amqp://user:password@host:port/vhost``).

    ``prefix`` starts the name of every exchange and queue, so several pigeon deployments
    can share one virtual host. Ordered groups keep a member's partitions while it
    heartbeats every ``heartbeat_interval_s``; a member silent for ``session_timeout_s``
    loses them; a joining member listens ``join_wait_s`` for the others before taking
    partitions. ``read_ahead`` is how many stored messages an ordered member buffers per
    partition. AMQP cannot say where a stream queue ends: pigeon reads its last chunk and
    treats ``probe_timeout_s`` of silence as "empty". A new shared group waits
    ``bind_grace_s`` after binding its queue before copying the history (see the package
    documentation). Core subscriptions keep ``subscription_buffer`` messages each, then
    drop the oldest.
    """

    prefix: str = "pigeon"
    connect_timeout_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    session_timeout_s: float = 10.0
    join_wait_s: float = 0.2
    read_ahead: int = 256
    probe_timeout_s: float = 0.3
    bind_grace_s: float = 0.1
    lock_timeout_s: float = 30.0
    subscription_buffer: int = 10_000

    def __post_init__(self) -> None:
        if (
            not isinstance(self.prefix, str)
            or not self.prefix
            or len(self.prefix) > 100
            or any(c.isspace() for c in self.prefix)
        ):
            raise InvalidConfigError(
                f"prefix must be 1 to 100 characters without spaces, not {self.prefix!r}"
            )
        for name in (
            "connect_timeout_s",
            "heartbeat_interval_s",
            "session_timeout_s",
            "join_wait_s",
            "probe_timeout_s",
            "bind_grace_s",
            "lock_timeout_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(f"{name} must be a positive number, not {value!r}")
        if self.heartbeat_interval_s * 2 > self.session_timeout_s:
            raise InvalidConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        for name in ("read_ahead", "subscription_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise InvalidConfigError(f"{name} must be an integer from 1 to 65535, not {value!r}")


class Names:
    """Where everything lives. Stream and group names are ``[A-Za-z0-9_-]``, never a ``.``,
    so every name below is unambiguous."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.core = f"{prefix}.core"  # topic exchange: core subscriptions bind here
        self.meta = f"{prefix}.meta"  # stream queue: the registry's log
        self.snapshots = f"{prefix}.meta.snapshots"  # stream queue: the registry at some offset

    def stream_exchange(self, stream: str) -> str:
        return f"{self.prefix}.s.{stream}"

    def partition_queue(self, stream: str, partition: int) -> str:
        return f"{self.prefix}.s.{stream}.{partition}"

    def group_queue(self, stream: str, group: str) -> str:
        return f"{self.prefix}.g.{stream}.{group}"

    def level_queue(self, stream: str, group: str, level: int) -> str:
        return f"{self.prefix}.w.{stream}.{group}.{level}"

    def token_queue(self, stream: str, group: str, partition: int) -> str:
        return f"{self.prefix}.o.{stream}.{group}.{partition}"

    def commit_queue(self, stream: str, group: str, partition: int) -> str:
        return f"{self.prefix}.c.{stream}.{group}.{partition}"

    def members_exchange(self, stream: str, group: str) -> str:
        return f"{self.prefix}.m.{stream}.{group}"

    def lock(self, what: str) -> str:
        return f"{self.prefix}.lock.{_digest(what)}"

    def queue_group(self, queue: str, pattern: str) -> str:
        return f"{self.prefix}.q.{_digest(queue + chr(10) + pattern)}"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:24]
