"""The registry of streams and groups: a log in a RabbitMQ stream queue, replayed by everyone.

AMQP can neither list exchanges nor store a small document, so pigeon keeps its catalogue
as records appended to the stream queue ``<prefix>.meta`` (``stream``, ``delete``,
``group``, ``ungroup``, ``level`` (a shared group's retry queue), ``purge``, ``sync``). Every
transport reads the log when it opens (from its latest snapshot) and keeps following it,
so all of them apply the same records in the same order and agree: the first ``stream``
record of a name wins (a later one, or one whose subjects overlap a live stream's, is
ignored by every reader), likewise for groups. Appending a ``sync`` record and waiting to
read it back makes a read linearizable: every record appended before it has been applied.

The log is bounded (``x-max-length-bytes``): a transport that appends a record when the
log has grown by `SNAPSHOT_EVERY` records since the last snapshot it knows writes the
whole registry, with the log offset it covers, to the stream queue ``<prefix>.meta.snapshots``.
Opening reads the latest snapshot and the log after it, so opening costs the registry's
size plus at most a few hundred records, however long pigeon has run; and retention only
removes records older than many snapshots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiormq.abc import DeliveredMessage

from ...engine.config import StartAt
from ...engine.groups.config import Backoff
from ...errors import TransportClosedError
from ...subjects import SubjectIndex, patterns_overlap
from ..base import ConsumerSpec, StreamSpec

log = logging.getLogger("pigeon.transport.rabbitmq")

Append = Callable[[bytes], Awaitable[None]]
Snapshot = Callable[[bytes], None]

SNAPSHOT_EVERY = 500


@dataclass
class GroupEntry:
    spec: ConsumerSpec
    # Where each partition started, resolved when the group was created (lag of ordered
    # groups before their first commit).
    starts: list[int]
    # The retry levels declared so far (shared groups): lag looks at those queues only, as
    # a passive declare of a missing queue costs a channel.
    levels: set[int] = field(default_factory=set)


@dataclass
class StreamEntry:
    spec: StreamSpec
    groups: dict[str, GroupEntry] = field(default_factory=dict)
    # Per partition, the offset below which a purge removed everything (stream queues
    # cannot be emptied: readers skip what lies below).
    floors: list[int] = field(default_factory=list)
    # Purges applied so far: stored publishes carry it, so shared groups can tell (and drop)
    # the copies of messages published before the latest purge.
    purges: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def floor(self, p: int) -> int:
        return self.floors[p] if p < len(self.floors) else 0


class Registry:
    def __init__(self, append: Append, snapshot: Snapshot, sync_timeout_s: float) -> None:
        self._append = append
        self._snapshot = snapshot
        self._timeout = sync_timeout_s
        self.offset = -1  # of the last record applied
        self._snapshot_offset = -1  # covered by the latest snapshot this transport knows
        self.streams: dict[str, StreamEntry] = {}
        self._index: SubjectIndex[str] = SubjectIndex()
        self._waiters: dict[str, asyncio.Future[bool]] = {}
        self._failed: BaseException | None = None

    # -- following the log ---------------------------------------------------------------------

    def apply(self, delivered: DeliveredMessage) -> None:
        """Apply one record; runs in log order (the consumer calls it synchronously)."""
        offset = (delivered.header.properties.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            if offset <= self.offset:
                return  # covered by the snapshot (a stream is read from its chunk's start)
            self.offset = offset
        try:
            record = json.loads(delivered.body)
            applied = self._apply(record)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring a malformed registry record %r: %s", delivered.body[:200], error)
            return
        waiter = self._waiters.pop(str(record.get("id")), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(applied)
            # Only the appender of a record considers a snapshot: one writer per record.
            if self.offset - self._snapshot_offset >= SNAPSHOT_EVERY:
                self._snapshot_offset = self.offset
                self._snapshot(json.dumps(self.snapshot()).encode())

    def snapshot(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "streams": [
                {
                    "spec": stream_spec_to_json(entry.spec),
                    "groups": [
                        {
                            "spec": consumer_spec_to_json(group.spec),
                            "starts": group.starts,
                            "levels": sorted(group.levels),
                        }
                        for group in entry.groups.values()
                    ],
                    "floors": entry.floors,
                    "purges": entry.purges,
                }
                for entry in self.streams.values()
            ],
        }

    def load(self, snapshot: dict[str, Any]) -> None:
        """Start from a snapshot (before following the log after its offset)."""
        for item in snapshot["streams"]:
            spec = stream_spec_from_json(item["spec"])
            entry = self.streams[spec.name] = StreamEntry(
                spec, floors=[int(f) for f in item.get("floors", [])], purges=int(item.get("purges", 0))
            )
            for pattern in spec.subjects:
                self._index.add(pattern, spec.name)
            for group in item["groups"]:
                consumer = consumer_spec_from_json(group["spec"])
                entry.groups[consumer.group] = GroupEntry(
                    consumer, [int(s) for s in group["starts"]], {int(k) for k in group.get("levels", [])}
                )
        self.offset = self._snapshot_offset = int(snapshot["offset"])

    def _apply(self, record: dict[str, Any]) -> bool:
        op = record.get("op")
        if op == "stream":
            spec = stream_spec_from_json(record["spec"])
            if spec.name in self.streams or self.overlapping(spec) is not None:
                return False
            self.streams[spec.name] = StreamEntry(spec)
            for pattern in spec.subjects:
                self._index.add(pattern, spec.name)
            return True
        if op == "delete":
            entry = self.streams.pop(record["name"], None)
            if entry is None:
                return False
            for pattern in entry.spec.subjects:
                self._index.remove(pattern, entry.name)
            return True
        if op == "group":
            stream = self.streams.get(record["stream"])
            group = consumer_spec_from_json(record["spec"])
            if stream is None or group.group in stream.groups:
                return False
            stream.groups[group.group] = GroupEntry(group, [int(s) for s in record["starts"]])
            return True
        if op == "level":
            stream = self.streams.get(record["stream"])
            known = None if stream is None else stream.groups.get(record["group"])
            if known is None or int(record["level"]) in known.levels:
                return False
            known.levels.add(int(record["level"]))
            return True
        if op == "purge":
            stream = self.streams.get(record["stream"])
            if stream is None:
                return False
            floors = [int(f) for f in record["floors"]]
            stream.floors = [max(stream.floor(p), f) for p, f in enumerate(floors)]
            stream.purges += 1
            return True
        if op == "ungroup":
            stream = self.streams.get(record["stream"])
            return stream is not None and stream.groups.pop(record["group"], None) is not None
        return op == "sync"

    def fail(self, error: BaseException) -> None:
        """The log cannot be followed any more (connection lost): wake every waiter."""
        self._failed = error
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(TransportClosedError(f"the registry log stopped: {error!r}"))
        self._waiters.clear()

    # -- appending -------------------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> bool:
        """Append ``record`` and wait until it is applied here; True when it took effect."""
        if self._failed is not None:
            raise TransportClosedError(f"the registry log stopped: {self._failed!r}")
        record_id = uuid.uuid4().hex
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[record_id] = waiter
        try:
            await self._append(json.dumps({**record, "id": record_id}).encode())
            async with asyncio.timeout(self._timeout):
                return await waiter
        except TimeoutError:
            raise TransportClosedError(
                f"the registry log did not return a record within {self._timeout}s"
            ) from None
        finally:
            self._waiters.pop(record_id, None)

    async def sync(self) -> None:
        await self.append({"op": "sync"})

    # -- queries ---------------------------------------------------------------------------------

    def route(self, subject: str) -> StreamEntry | None:
        for name in self._index.match(subject):
            return self.streams.get(name)
        return None

    def overlapping(self, spec: StreamSpec) -> StreamEntry | None:
        for entry in self.streams.values():
            if entry.name == spec.name:
                continue
            for mine in spec.subjects:
                for theirs in entry.spec.subjects:
                    if patterns_overlap(mine, theirs):
                        return entry
        return None


# -- specs as JSON -----------------------------------------------------------------------------------


def stream_spec_to_json(spec: StreamSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "subjects": list(spec.subjects),
        "partitions": spec.partitions,
        "max_age_s": spec.max_age_s,
        "max_msgs": spec.max_msgs,
        "max_bytes": spec.max_bytes,
        "dedup_window_s": spec.dedup_window_s,
    }


def stream_spec_from_json(data: dict[str, Any]) -> StreamSpec:
    return StreamSpec(
        name=data["name"],
        subjects=tuple(data["subjects"]),
        partitions=int(data["partitions"]),
        max_age_s=data.get("max_age_s"),
        max_msgs=data.get("max_msgs"),
        max_bytes=data.get("max_bytes"),
        dedup_window_s=float(data.get("dedup_window_s", 120.0)),
    )


def consumer_spec_to_json(spec: ConsumerSpec) -> dict[str, Any]:
    backoff = spec.backoff
    return {
        "group": spec.group,
        "kind": spec.kind,
        "start": {"kind": spec.start.kind, "value": spec.start.value},
        "ack_wait_s": spec.ack_wait_s,
        "max_deliver": spec.max_deliver,
        "backoff": None
        if backoff is None
        else {
            "delays_s": list(backoff.delays_s),
            "initial_s": backoff.initial_s,
            "multiplier": backoff.multiplier,
            "max_s": backoff.max_s,
            "jitter": backoff.jitter,
        },
        "max_ack_pending": spec.max_ack_pending,
        "key_ordered": spec.key_ordered,
        "dead_letter": spec.dead_letter,
    }


def consumer_spec_from_json(data: dict[str, Any]) -> ConsumerSpec:
    start = data["start"]
    backoff = data.get("backoff")
    return ConsumerSpec(
        group=data["group"],
        kind=data["kind"],
        start=StartAt(start["kind"], start["value"]),
        ack_wait_s=data["ack_wait_s"],
        max_deliver=data.get("max_deliver"),
        backoff=None
        if backoff is None
        else Backoff(
            delays_s=tuple(backoff["delays_s"]),
            initial_s=backoff["initial_s"],
            multiplier=backoff["multiplier"],
            max_s=backoff["max_s"],
            jitter=backoff["jitter"],
        ),
        max_ack_pending=data["max_ack_pending"],
        key_ordered=data.get("key_ordered", False),
        dead_letter=data.get("dead_letter", True),
    )
