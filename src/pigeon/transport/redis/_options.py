"""The Redis transport's options and the names of every key and channel it uses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import InvalidConfigError

# Characters Redis's glob matcher gives a meaning to; anything literal in a pattern (the
# prefix, a subject token) is escaped so that only pigeon's own wildcards act as wildcards.
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class RedisOptions:
    """Settings of the Redis transport (``redis://host:port/db``).

    ``prefix`` namespaces every key and channel, so several pigeon deployments can share one
    Redis database. ``claim_interval_s`` is how often an idle group member looks for expired
    leases (the longest a lease outlives ``ack_wait_s`` before another member takes it).
    Ordered groups keep a member's partitions while it heartbeats every
    ``heartbeat_interval_s``; a member silent for ``session_timeout_s`` loses them.
    ``exact_trim`` makes ``max_msgs``/``max_age_s`` retention exact (``MAXLEN =``), at some
    cost; by default Redis trims whole internal nodes (``MAXLEN ~``). Core subscriptions buffer
    ``subscription_buffer`` messages each, then drop the oldest (counted and logged). A member
    waiting in `fetch` holds a pooled connection while it blocks (up to ``claim_interval_s``),
    so ``max_connections`` (None: unbounded) must exceed the number of members fetching at once.
    """

    prefix: str = "pigeon"
    claim_interval_s: float = 0.5
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    exact_trim: bool = False
    subscription_buffer: int = 10_000
    max_connections: int | None = None
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix or any(c.isspace() for c in self.prefix):
            raise InvalidConfigError(f"prefix must be non-empty text without spaces, not {self.prefix!r}")
        for name in ("claim_interval_s", "session_timeout_s", "heartbeat_interval_s", "connect_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(f"{name} must be a positive number, not {value!r}")
        if self.heartbeat_interval_s * 2 > self.session_timeout_s:
            raise InvalidConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        if not isinstance(self.exact_trim, bool):
            raise InvalidConfigError(f"exact_trim must be a bool, not {self.exact_trim!r}")
        for name in ("subscription_buffer", "max_connections"):
            value = getattr(self, name)
            if value is None and name == "max_connections":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}")


def glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class Keys:
    """Where everything lives. Stream and group names are ``[A-Za-z0-9_-]``, so they never
    contain the ``:`` and ``|`` separators used here."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = f"{prefix}:streams"  # hash: stream name -> its spec (JSON)
        self.version = f"{prefix}:streams:v"  # bumped on every create/delete: publishers reroute
        self.queues = f"{prefix}:q"  # hash: queue member id -> "<queue>\n<pattern>"
        self.channel_prefix = f"{prefix}:c:"
        self.queue_channel_prefix = f"{prefix}:qm:"

    def partition(self, stream: str, p: int) -> str:
        return f"{self.prefix}:s:{stream}:{p}"

    def meta(self, stream: str) -> str:
        # hash: "n:<p>" -> the next pigeon offset of partition p
        return f"{self.prefix}:m:{stream}"

    def dedup(self, stream: str, msg_id: str) -> str:
        return f"{self.prefix}:d:{stream}:{msg_id}"

    def dedup_pattern(self, stream: str) -> str:
        return f"{glob_escape(self.prefix)}:d:{stream}:*"

    def groups(self, stream: str) -> str:
        # hash: group name -> its spec (JSON)
        return f"{self.prefix}:g:{stream}"

    def delayed(self, stream: str, group: str) -> str:
        # zset: "<p>|<entry id>" -> when the nacked message is due again (ms)
        return f"{self.prefix}:gd:{stream}:{group}"

    def failures(self, stream: str, group: str) -> str:
        # hash: "<p>|<entry id>" -> what went wrong so far (JSON), for the dead letter
        return f"{self.prefix}:gf:{stream}:{group}"

    def members(self, stream: str, group: str) -> str:
        # zset: ordered-group member token -> when its session expires (ms)
        return f"{self.prefix}:om:{stream}:{group}"

    def lock(self, stream: str, group: str, p: int) -> str:
        return f"{self.prefix}:ol:{stream}:{group}:{p}"

    def pause(self, stream: str, group: str, p: int) -> str:
        return f"{self.prefix}:op:{stream}:{group}:{p}"

    def channel(self, subject: str) -> str:
        return self.channel_prefix + subject

    def queue_channel(self, member: str) -> str:
        return self.queue_channel_prefix + member

    def glob(self, pattern: str) -> str:
        """A Redis glob matching at least every subject ``pattern`` matches.

        NATS's ``*`` is one token, but a glob ``*`` also crosses dots, so the glob can
        over-match; subscribers filter with `pigeon.subjects.matches`. ``>`` (one or more
        trailing tokens) becomes ``*`` after its dot, which is exact: a subject never ends
        with a dot.
        """
        tokens = [t if t in ("*", ">") else glob_escape(t) for t in pattern.split(".")]
        return glob_escape(self.channel_prefix) + ".".join("*" if t == ">" else t for t in tokens)
