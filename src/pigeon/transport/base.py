"""The Transport contract: what every engine pigeon runs on must offer.

Two ideas from Watermill: the contract is small, and settling lives on the received message
(`Received.ack` and friends). Everything above this layer (the application layer, the
patterns) is written against these types only, so moving from the embedded engine to NATS,
Redis, RabbitMQ or PostgreSQL is a URL change.

A transport declares what it can do in `Capabilities`. A feature it lacks is either provided
by pigeon on top of the engine's primitives (and listed in ``emulated``), or refused with
`UnsupportedFeatureError` naming the backend and the alternative: never silently ignored.

Publishing has NATS semantics: a publish reaches every matching core subscription (at most
once, no storage) and, if a stream captures the subject, is stored there (at least once,
acknowledged with a `PubAck`). A publish no stream captures returns None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from ..engine.config import StartAt, validate_name
from ..engine.groups.config import Backoff
from ..engine.groups.lag import PartitionLag
from ..engine.stream import PubAck
from ..errors import InvalidConfigError, InvalidMessageError, UnsupportedFeatureError
from ..message import Headers, Message
from ..subjects import validate_pattern

__all__ = [
    "Backoff",
    "Capabilities",
    "Consumer",
    "ConsumerSpec",
    "PartitionLag",
    "PubAck",
    "Received",
    "StartAt",
    "StreamSpec",
    "StreamState",
    "Subscription",
    "Transport",
]


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do. ``emulated`` names the flags pigeon provides on top of the
    engine's own primitives (each transport module documents how)."""

    durable: bool = False  # stored messages survive a broker restart
    wildcards: bool = False  # core subscriptions with '*' and '>'
    queue_groups: bool = False  # core subscriptions sharing messages within a queue group
    request_reply: bool = False
    no_responders: bool = False  # a request with no subscriber fails at once
    partitions: bool = False  # streams split into partitions with keyed routing
    ordered_groups: bool = False  # Kafka-style groups: one member per partition, in order
    shared_groups: bool = False  # queue-style groups: any member, per-message leases
    per_key_order: bool = False  # messages of one key processed in order (ordered or key_ordered)
    delayed_nack: bool = False  # nack(delay=...) waits at least the delay
    ack_timeout: bool = False  # an unacknowledged message is redelivered after ack_wait
    in_progress: bool = False  # a lease can be extended
    max_deliver: bool = False  # a message gives up after max_deliver deliveries
    dead_letters: bool = False  # given-up messages go to a dead-letter stream with failure headers
    dedup: bool = False  # a publish with a known message id is stored once
    replay_offset: bool = False  # a new group can start at an offset (or the beginning)
    replay_time: bool = False  # a new group can start at a time
    lag: bool = False  # lag per group and partition
    emulated: frozenset[str] = field(default_factory=frozenset)

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "emulated" and getattr(self, f.name)]


@dataclass(frozen=True)
class StreamSpec:
    """A durable stream, described independently of the engine that stores it."""

    name: str
    subjects: tuple[str, ...]
    partitions: int = 1
    max_age_s: float | None = None
    max_msgs: int | None = None
    max_bytes: int | None = None
    dedup_window_s: float = 120.0

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.subjects, str) or not self.subjects:
            raise InvalidConfigError(f"stream {self.name!r}: subjects must be a non-empty list of patterns")
        object.__setattr__(self, "subjects", tuple(validate_pattern(s) for s in self.subjects))
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or self.partitions < 1:
            raise InvalidConfigError(f"stream {self.name!r}: partitions must be a positive integer")


@dataclass(frozen=True)
class StreamState:
    name: str
    subjects: tuple[str, ...]
    partitions: int
    messages: int  # messages stored now (after retention)
    last_offsets: tuple[int, ...]  # per partition: the last offset written, -1 when none


GroupKind = Literal["ordered", "shared"]


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable consumer group on a stream.

    ``ordered``: members split the partitions, each partition in offset order, one
    outstanding batch per partition (a nack rewinds it). ``shared``: any member gets any
    message, each leased for ``ack_wait_s``; ``key_ordered`` keeps one key out of flight
    twice. ``max_deliver`` None is unlimited.
    """

    group: str
    kind: GroupKind = "shared"
    start: StartAt = field(default_factory=StartAt.earliest)
    ack_wait_s: float = 30.0
    max_deliver: int | None = None
    backoff: Backoff | None = None
    max_ack_pending: int = 1000
    key_ordered: bool = False
    dead_letter: bool = True

    def __post_init__(self) -> None:
        validate_name(self.group, "group")
        if self.kind not in ("ordered", "shared"):
            raise InvalidConfigError(f"group {self.group!r}: kind must be 'ordered' or 'shared'")
        if not isinstance(self.start, StartAt):
            raise InvalidConfigError(f"group {self.group!r}: start must be a StartAt")
        if (
            isinstance(self.ack_wait_s, bool)
            or not isinstance(self.ack_wait_s, int | float)
            or self.ack_wait_s <= 0
        ):
            raise InvalidConfigError(f"group {self.group!r}: ack_wait_s must be a positive number")
        for name in ("max_deliver", "max_ack_pending"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidConfigError(f"group {self.group!r}: {name} must be a positive integer")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise InvalidConfigError(f"group {self.group!r}: backoff must be a Backoff")
        if self.key_ordered and self.kind == "ordered":
            raise InvalidConfigError(
                f"group {self.group!r}: key_ordered is for shared groups; ordered groups keep "
                "every key in order already"
            )


@runtime_checkable
class Received(Protocol):
    """A message delivered to a consumer group member, with the operations that settle it.

    Settle exactly once. ``delivery_count`` is 1 on the first delivery.
    """

    message: Message
    delivery_count: int

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    async def ack(self) -> None: ...
    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None: ...
    async def term(self, reason: BaseException | str | None = None) -> None: ...
    async def in_progress(self) -> None: ...


class Consumer(ABC):
    """One member of a consumer group: pull with `fetch`, or iterate."""

    @abstractmethod
    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        """Long-poll: up to ``max_messages`` as soon as any are available, or [] after ``timeout``."""

    async def __aiter__(self) -> AsyncIterator[Received]:
        while True:
            for received in await self.fetch(100, 5.0):
                yield received

    @abstractmethod
    async def close(self) -> None:
        """Leave the group; unsettled messages are delivered again (to this or another member)."""


class Subscription(ABC):
    """A core (non-durable) subscription: messages published while it exists, at most once."""

    @abstractmethod
    async def next(self, timeout: float | None = None) -> Message:
        """The next message; `TimeoutError` after ``timeout``."""

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            yield await self.next()

    @abstractmethod
    async def unsubscribe(self) -> None: ...


class Transport(ABC):
    """The contract. Backend-specific settings come in the transport's options object."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # One line per emulated capability: how pigeon provides it on this engine.
    emulation_notes: ClassVar[dict[str, str]] = {}

    def require(self, capability: str, alternative: str) -> None:
        """Refuse, clearly, what this transport cannot do."""
        if not getattr(self.capabilities, capability):
            raise UnsupportedFeatureError(self.name, capability.replace("_", " "), alternative)

    @classmethod
    @abstractmethod
    async def open(cls, url: str, options: Any = None) -> Transport:
        """Connect to the engine at ``url``; ``options`` is this transport's typed options object."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- publishing ---------------------------------------------------------------------------

    @abstractmethod
    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Deliver to core subscribers and store in the capturing stream (its ack), if any."""

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        """Publish several messages, in order. Transports with a batch primitive override this."""
        return [
            await self.publish(
                m.subject, m.payload, key=m.key, headers=m.headers, msg_id=m.id if m.has_explicit_id else None
            )
            for m in messages
        ]

    # -- core messaging -----------------------------------------------------------------------------

    @abstractmethod
    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription: ...

    @abstractmethod
    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        """Send a request and wait for one reply (`RequestTimeoutError`, `NoRespondersError`)."""

    async def reply(
        self, request: Message, payload: bytes = b"", *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request received on a core subscription (to its `Headers.REPLY_TO` subject).

        Every transport sets that header on the messages its subscriptions yield when the
        sender expects a reply (NATS's reply subject, or the inbox pigeon made for `request`).
        """
        reply_to = request.headers.get(Headers.REPLY_TO)
        if not reply_to:
            raise InvalidMessageError(f"{request!r} is not a request: it has no {Headers.REPLY_TO} header")
        await self.publish(reply_to, payload, headers=headers)

    # -- streams and groups ----------------------------------------------------------------------------

    @abstractmethod
    async def create_stream(self, spec: StreamSpec) -> None:
        """Create the stream; a no-op when it exists with the same subjects and partitions."""

    @abstractmethod
    async def delete_stream(self, name: str) -> None:
        """Delete the stream, its groups and their dead-letter streams."""

    @abstractmethod
    async def stream_state(self, name: str) -> StreamState: ...

    async def list_streams(self) -> list[str]:
        """The names of every stream, sorted, dead-letter and retry streams included."""
        raise UnsupportedFeatureError(
            self.name,
            "listing streams",
            "use the names of the streams you created, or the broker's own tools",
        )

    async def purge_stream(self, name: str) -> None:
        """Remove every message of the stream; the stream and its groups stay."""
        raise UnsupportedFeatureError(
            self.name, "purging streams", "delete the stream and create it again (its groups go with it)"
        )

    @abstractmethod
    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        """Join (creating if needed) the group ``spec.group`` on ``stream`` as a member."""

    @abstractmethod
    async def delete_group(self, stream: str, group: str) -> None: ...

    @abstractmethod
    async def lag(self, stream: str, group: str) -> list[PartitionLag]: ...

    @abstractmethod
    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        """The dead letters of a group, oldest first, each with the failure headers
        (`pigeon.message.Headers`); `UnsupportedFeatureError` when ``dead_letters`` is False."""
