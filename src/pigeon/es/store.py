"""The event store: aggregates' events in one pigeon stream of the embedded engine.

Layout: one stream per store; aggregate ``Account`` ``a-1`` has subject
``<stream>.Account.a-1`` and key ``a-1``, so all its events sit in one partition, in order.
A command's events are one batch: appended atomically, with the expectation that the
subject's last offset is still the one the writer saw (the engine's expected last subject
offset), so a concurrent writer gets `AggregateConflictError` and nothing is written. The
stream's offsets are the global order that projections follow; with one partition (the
default) it is a total order of every event of the store.

Each event carries headers: its type name and schema version, the aggregate version it
brings the aggregate to, its index in its commit, and the offset of the previous commit's
last event. Those back links let an aggregate be read by walking its own commits from the
newest (the engine remembers each subject's last offset), one fetch per commit, without
scanning other aggregates' events; a snapshot stops the walk early.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, Expect, StartAt, StreamConfig
from ..engine.config import Durability
from ..errors import ConcurrencyConflictError, InvalidConfigError, UnsupportedFeatureError
from ..message import Message
from .errors import AggregateConflictError, EventDecodeError, InvalidAggregateIdError
from .events import EventRegistry

__all__ = ["AppendResult", "EventStore", "Position", "RecordedEvent", "StoredEvent"]

TYPE = "Pigeon-Es-Type"
SCHEMA = "Pigeon-Es-Schema"
VERSION = "Pigeon-Es-Version"
INDEX = "Pigeon-Es-Index"
PREVIOUS = "Pigeon-Es-Previous"
_OWN = (TYPE, SCHEMA, VERSION, INDEX, PREVIOUS)

_TOKEN = re.compile(r"^[A-Za-z0-9_:-]{1,128}$")
_YIELD_EVERY = 1000  # commits walked between turns of the event loop


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event is stored: its partition and offset in the store's stream."""

    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: JSON payload, type name and the schema version it was written with."""

    aggregate_type: str
    aggregate_id: str
    version: int
    event_type: str
    schema_version: int
    payload: bytes
    position: Position
    timestamp: float
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A stored event decoded (and upcast) into its class."""

    aggregate_type: str
    aggregate_id: str
    version: int
    event: Any
    position: Position
    timestamp: float
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The aggregate's version after an append and where its events went (first and last)."""

    version: int
    first: Position
    last: Position


class EventStore:
    """Append and read aggregates' events; open with `EventStore.open` on an `Engine`."""

    def __init__(self, engine: Engine, stream: str, registry: EventRegistry) -> None:
        self.engine = engine
        self.stream = stream
        self.registry = registry

    @classmethod
    async def open(
        cls,
        engine: Engine,
        stream: str = "events",
        *,
        registry: EventRegistry | None = None,
        partitions: int = 1,
        durability: Durability = "always",
    ) -> EventStore:
        """Use (creating it if needed) the stream ``stream``; it must keep every message."""
        if stream in engine.streams():
            config = engine.stream_info(stream).config
            _check_stream(config)
        else:
            await engine.create_stream(
                StreamConfig(stream, (f"{stream}.>",), partitions=partitions, durability=durability)
            )
        return cls(engine, stream, registry or EventRegistry())

    @classmethod
    async def for_transport(
        cls, transport: object, stream: str = "events", *, registry: EventRegistry | None = None
    ) -> EventStore:
        """An event store on a transport: only the embedded one can guarantee that concurrent
        writers of one aggregate do not overwrite each other's events."""
        engine = getattr(transport, "engine", None)
        if isinstance(engine, Engine):
            return await cls.open(engine, stream, registry=registry)
        raise UnsupportedFeatureError(
            str(getattr(transport, "name", type(transport).__name__)),
            "appends that expect the aggregate's last offset (optimistic concurrency)",
            "keep the event store on the embedded engine (EventStore.open(engine) or a file:// "
            "transport) in the process that owns it; its projections may publish anywhere",
        )

    # -- writing --------------------------------------------------------------------------------

    def subject(self, aggregate_type: str, aggregate_id: str) -> str:
        check_token("aggregate type", aggregate_type)
        check_token("aggregate id", aggregate_id)
        return f"{self.stream}.{aggregate_type}.{aggregate_id}"

    async def append(
        self,
        aggregate_type: str,
        aggregate_id: str,
        events: Sequence[object],
        *,
        expected_version: int,
        metadata: Mapping[str, str] | None = None,
    ) -> AppendResult:
        """Append a command's events atomically if the aggregate is at ``expected_version``
        (0: it must not exist yet); otherwise `AggregateConflictError` and nothing is written."""
        encoded = [self.registry.encode(event) for event in events]
        return await self.append_stored(
            aggregate_type, aggregate_id, encoded, expected_version=expected_version, metadata=metadata
        )

    async def append_stored(
        self,
        aggregate_type: str,
        aggregate_id: str,
        events: Sequence[tuple[str, int, bytes]],
        *,
        expected_version: int,
        metadata: Mapping[str, str] | None = None,
    ) -> AppendResult:
        """`append` for events already encoded as (type name, schema version, JSON payload)."""
        subject = self.subject(aggregate_type, aggregate_id)
        if not events:
            raise InvalidConfigError("an append needs at least one event")
        if not _is_count(expected_version):
            raise InvalidConfigError(f"expected_version must be an integer >= 0, not {expected_version!r}")
        extra = dict(metadata or {})
        if clash := sorted(set(extra) & set(_OWN)):
            raise InvalidConfigError(f"metadata cannot set the event store's own headers {clash}")
        # The version check gives the caller a precise error; the expectation on the append
        # is what makes it safe: anything appended after this read becomes a conflict.
        last = self.engine.last_message(self.stream, subject)
        actual = 0 if last is None else _int_header(last, VERSION)
        if actual != expected_version:
            raise AggregateConflictError(subject, expected=expected_version, actual=actual)
        previous = -1 if last is None else _offset(last)
        messages = [
            Message(
                subject,
                payload,
                key=aggregate_id,
                headers={
                    **extra,
                    TYPE: type_name,
                    SCHEMA: str(schema),
                    VERSION: str(expected_version + i + 1),
                    INDEX: str(i),
                    PREVIOUS: str(previous),
                },
            )
            for i, (type_name, schema, payload) in enumerate(events)
        ]
        try:
            acks = await self.engine.publish_batch(messages, expect=Expect(last_subject_offset=previous))
        except ConcurrencyConflictError:
            now = self.engine.last_message(self.stream, subject)
            raise AggregateConflictError(
                subject, expected=expected_version, actual=0 if now is None else _int_header(now, VERSION)
            ) from None
        return AppendResult(
            expected_version + len(events),
            Position(acks[0].partition, acks[0].offset),
            Position(acks[-1].partition, acks[-1].offset),
        )

    # -- reading --------------------------------------------------------------------------------

    async def read(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        after_version: int = 0,
        upto_version: int | None = None,
        upto_time: float | None = None,
    ) -> list[RecordedEvent]:
        """The aggregate's events after ``after_version``, decoded, oldest first; optionally
        only those up to a version or stored at or before a time (seconds since the epoch)."""
        stored = await self.read_stored(
            aggregate_type, aggregate_id, after_version=after_version, upto_version=upto_version
        )
        return [self.decode(s) for s in stored if upto_time is None or s.timestamp <= upto_time]

    async def read_stored(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        after_version: int = 0,
        upto_version: int | None = None,
    ) -> list[StoredEvent]:
        """`read` without decoding. Costs one fetch per commit newer than ``after_version``."""
        subject = self.subject(aggregate_type, aggregate_id)
        last = self.engine.last_message(self.stream, subject)
        commits: list[list[Message]] = []
        walked = 0
        while last is not None and _int_header(last, VERSION) > after_version:
            index = _int_header(last, INDEX)
            commit = [last]
            if index:
                commit = self.engine.fetch(self.stream, _partition(last), _offset(last) - index, index + 1)
                if len(commit) != index + 1 or any(m.subject != subject for m in commit):
                    raise EventDecodeError(f"the commit ending at {last!r} is not whole in the log")
            commits.append(commit)
            previous = _int_header(last, PREVIOUS)
            last = None
            if previous >= 0:
                found = self.engine.fetch(self.stream, _partition(commit[0]), previous, 1)
                if not found or found[0].subject != subject:
                    raise EventDecodeError(
                        f"{subject}: the commit before offset {_offset(commit[0])} is missing from the log"
                    )
                last = found[0]
            walked += 1
            if walked % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        out = []
        for commit in reversed(commits):
            for message in commit:
                event = _stored(message, aggregate_type, aggregate_id)
                if event.version > after_version and (upto_version is None or event.version <= upto_version):
                    out.append(event)
        return out

    def version(self, aggregate_type: str, aggregate_id: str) -> int:
        """How many events the aggregate has (0: none)."""
        last = self.last_stored(aggregate_type, aggregate_id)
        return 0 if last is None else last.version

    def last_stored(self, aggregate_type: str, aggregate_id: str) -> StoredEvent | None:
        """The aggregate's newest event (one fetch), or None."""
        last = self.engine.last_message(self.stream, self.subject(aggregate_type, aggregate_id))
        return None if last is None else _stored(last, aggregate_type, aggregate_id)

    async def read_all(
        self, partition: int = 0, from_offset: int = 0, *, batch: int = 1000
    ) -> AsyncIterator[StoredEvent]:
        """Every event of one partition from ``from_offset`` to the current end: the global order."""
        start = StartAt.offset(from_offset)
        async for message in self.engine.read(self.stream, partition, start, batch=batch):
            yield stored_event(message)

    def end(self) -> list[int]:
        """Per partition, the offset the next event will get."""
        return [p.next_offset for p in self.engine.stream_info(self.stream).partitions]

    def timestamp(self, position: Position) -> float:
        """When the event at ``position`` was stored."""
        found = self.engine.fetch(self.stream, position.partition, position.offset, 1)
        if not found or found[0].offset != position.offset:
            raise EventDecodeError(f"no event at {position} in stream {self.stream!r}")
        return found[0].timestamp

    def decode(self, stored: StoredEvent) -> RecordedEvent:
        return RecordedEvent(
            stored.aggregate_type,
            stored.aggregate_id,
            stored.version,
            self.registry.decode(stored.event_type, stored.schema_version, stored.payload),
            stored.position,
            stored.timestamp,
            stored.metadata,
        )


def check_token(what: str, token: object) -> str:
    """``token`` if it can be an aggregate type or id: it becomes a subject token and a file name."""
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise InvalidAggregateIdError(
            f"{what} {token!r} must be 1 to 128 letters, digits, '_', ':' or '-' (it becomes a subject token)"
        )
    return token


def stored_event(message: Message) -> StoredEvent:
    """The event a message of an event store's stream holds."""
    parts = message.subject.split(".")
    if len(parts) != 3:
        raise EventDecodeError(f"{message!r} is not an event store record (subject <stream>.<type>.<id>)")
    return _stored(message, parts[1], parts[2])


def _stored(message: Message, aggregate_type: str, aggregate_id: str) -> StoredEvent:
    headers = message.headers
    type_name = headers.get(TYPE)
    if type_name is None:
        raise EventDecodeError(f"{message!r} is not an event store record (no {TYPE} header)")
    return StoredEvent(
        aggregate_type,
        aggregate_id,
        _int_header(message, VERSION),
        type_name,
        _int_header(message, SCHEMA),
        message.payload,
        Position(_partition(message), _offset(message)),
        message.timestamp,
        {k: v for k, v in headers.items() if k not in _OWN},
    )


def _int_header(message: Message, name: str) -> int:
    try:
        return int(message.headers[name])
    except (KeyError, ValueError):
        raise EventDecodeError(f"{message!r} is not an event store record (header {name})") from None


def _offset(message: Message) -> int:
    assert message.offset is not None  # read from the log: always set
    return message.offset


def _partition(message: Message) -> int:
    assert message.partition is not None
    return message.partition


def _check_stream(config: StreamConfig) -> None:
    limits = {
        "max_age_s": config.max_age_s,
        "max_bytes": config.max_bytes,
        "max_msgs": config.max_msgs,
        "max_msgs_per_subject": config.max_msgs_per_subject,
    }
    if set_limits := [f"{k}={v}" for k, v in limits.items() if v is not None]:
        raise InvalidConfigError(
            f"stream {config.name!r} has retention limits ({', '.join(set_limits)}): an event store "
            "needs a stream that keeps every event; use another stream name"
        )
    if config.subjects != (f"{config.name}.>",):
        raise InvalidConfigError(
            f"stream {config.name!r} captures {list(config.subjects)}, not the event store layout "
            f"['{config.name}.>']; use another stream name"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
