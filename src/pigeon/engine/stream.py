"""A stream: routing messages to partitions, deduplication, optimistic concurrency, limits."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

from ..errors import (
    ConcurrencyConflictError,
    InvalidMessageError,
    MessageTooLargeError,
    StreamFullError,
)
from ..message import Message, new_id_base
from . import records
from .config import StreamConfig
from .dedup import DedupWindow
from .murmur2 import partition_for_key
from .partition import Partition
from .segment import Segment


class PubAck(NamedTuple):
    """Where a published message was stored; ``duplicate`` when its id was seen in the window."""

    stream: str
    partition: int
    offset: int
    duplicate: bool = False


class BatchAck(Sequence[PubAck]):
    """The acks of a batch publish, built on access (batches can hold a million messages)."""

    __slots__ = ("_duplicates", "_offsets", "_partitions", "stream")

    def __init__(
        self, stream: str, partitions: Sequence[int], offsets: Sequence[int], duplicates: set[int]
    ) -> None:
        self.stream = stream
        self._partitions = partitions
        self._offsets = offsets
        self._duplicates = duplicates

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, i: int) -> PubAck: ...
    @overload
    def __getitem__(self, i: slice) -> list[PubAck]: ...
    def __getitem__(self, i: int | slice) -> PubAck | list[PubAck]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("batch ack index out of range")
        return PubAck(self.stream, self._partitions[i], self._offsets[i], i in self._duplicates)

    def __iter__(self) -> Iterator[PubAck]:
        for i in range(len(self._offsets)):
            yield self[i]

    @property
    def duplicates(self) -> int:
        return len(self._duplicates)


@dataclass(frozen=True, slots=True)
class Expect:
    """Optimistic-concurrency expectations for a publish; -1 means "nothing there yet".

    ``last_offset`` is the partition's last offset; ``last_subject_offset`` is the offset of
    the last message on the published subject in that partition. A mismatch writes nothing.
    """

    last_offset: int | None = None
    last_subject_offset: int | None = None


def append_time_ns() -> int:
    """Now, in whole microseconds: a float of seconds (``Message.timestamp``) holds that exactly,
    so reading from a message's own timestamp finds that message."""
    return time.time_ns() // 1000 * 1000


class _Group:
    """The messages of one publish bound for one partition."""

    __slots__ = ("encoded", "explicit_ids", "indexes", "subjects", "uniform")

    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.encoded: list[bytes] = []
        self.subjects: list[str] = []
        self.explicit_ids: list[tuple[str, int]] = []
        self.uniform = True  # one subject and no optional fields: readers take a faster path

    def add(self, index: int, record: bytes, subject: str, explicit_id: str | None) -> None:
        if self.uniform and (record[4] != 0 or (self.subjects and subject != self.subjects[0])):
            self.uniform = False
        if explicit_id is not None:
            self.explicit_ids.append((explicit_id, len(self.encoded)))
        self.indexes.append(index)
        self.encoded.append(record)
        self.subjects.append(subject)


class Stream:
    def __init__(self, config: StreamConfig, directory: Path, max_message_bytes: int) -> None:
        self.config = config
        self.name = config.name
        self.directory = directory
        self.max_message_bytes = max_message_bytes
        self.partitions: list[Partition] = []
        self.dedup = DedupWindow(config.dedup_window_s)
        self._round_robin = itertools.cycle(range(config.partitions))
        self._id_ms = -1
        self._id_next = 0
        self._last_yield_ns = 0
        # Half the interval: an fsync round takes two turns of the loop (start, then finish).
        self._yield_every_ns = config.fsync_interval_ms * 500_000

    @classmethod
    def open(cls, config: StreamConfig, directory: Path, max_message_bytes: int) -> Stream:
        """Open every partition, recovering them. Blocking: call from a thread."""
        stream = cls(config, directory, max_message_bytes)
        stream.partitions = [
            Partition.open(directory / f"p{i}", config.name, i, config) for i in range(config.partitions)
        ]
        return stream

    def reconfigure(self, config: StreamConfig) -> None:
        """Take a new configuration that differs only in what `Engine.update_stream` allows."""
        self.config = config
        self.dedup.resize(config.dedup_window_s)
        for partition in self.partitions:
            partition.config = config

    def bind(self, executor: Executor) -> None:
        for partition in self.partitions:
            partition.bind(executor, self.dedup)
        self.dedup.sort()

    def partition_for(self, key: str) -> int:
        return partition_for_key(key.encode(), self.config.partitions)

    def _next_id_base(self, now_ns: int, count: int) -> int:
        """Ids for ``count`` messages: a fresh random UUIDv7 base each millisecond, counted up within it."""
        now_ms = now_ns // 1_000_000
        if now_ms != self._id_ms:
            self._id_ms = now_ms
            self._id_next = new_id_base(now_ms)
        base = self._id_next
        self._id_next += count
        return base

    def _write(
        self,
        partition: Partition,
        encoded: list[bytes],
        subjects: list[str] | str,
        explicit_ids: list[tuple[str, int]] | None,
        now_ns: int,
        uniform: bool = False,
    ) -> tuple[int, int]:
        """Append one batch to one partition; returns (base offset, write sequence).

        Synchronous on purpose: checks made before it cannot be invalidated by another task.
        """
        base_offset, seq = partition.append(
            encoded, subjects, explicit_ids, now_ns, self._next_id_base(now_ns, len(encoded)), uniform
        )
        if partition.rolled:
            self.apply_retention(now_ns)
        return base_offset, seq

    async def _durable(self, partition: Partition, seq: int, now_ns: int) -> None:
        if self.config.durability == "always":
            await partition.wait_durable(seq)
        elif now_ns - self._last_yield_ns > self._yield_every_ns:
            # A publisher that never awaits anything real would starve the interval fsync and
            # the segment seals, which run as tasks: yield to the loop once per interval.
            self._last_yield_ns = now_ns
            await asyncio.sleep(0)

    async def _duplicate(self, seen: tuple[int, int]) -> PubAck:
        partition = self.partitions[seen[0]]
        if self.config.durability == "always":
            # The original may still be waiting for its fsync: a duplicate is acked no sooner.
            await partition.wait_durable(partition.written)
        return PubAck(self.name, seen[0], seen[1], True)

    async def publish_one(
        self,
        subject: str,
        payload: bytes,
        key: str | None,
        headers: dict[str, str] | None,
        msg_id: str | None,
        expect: Expect | None,
    ) -> PubAck:
        """The single-message path (no lists, no grouping): most publishes take it."""
        now_ns = append_time_ns()
        if msg_id is not None:
            seen = self.dedup.lookup(msg_id, now_ns)
            if seen is not None:
                return await self._duplicate(seen)
        record = records.encode_record(subject, payload, key, headers, msg_id)
        self._check_size(subject, record)
        p = next(self._round_robin) if key is None else self.partition_for(key)
        partition = self.partitions[p]
        if expect is not None:
            self._check_expectations(p, subject, expect)
        if self.config.discard == "new":
            self._check_room(1, len(record))
        offset, seq = self._write(
            partition, [record], subject, None if msg_id is None else [(msg_id, 0)], now_ns
        )
        await self._durable(partition, seq, now_ns)
        return PubAck(self.name, p, offset)

    async def publish_many(
        self, subject: str, payloads: Sequence[bytes], key: str | None, headers: dict[str, str] | None
    ) -> BatchAck:
        """Bulk path: one subject, one key, shared headers, one partition, one atomic batch."""
        now_ns = append_time_ns()
        uniform = key is None and not headers
        if uniform:
            encoded = records.encode_plain_records(subject, payloads)
        else:
            encoded = [records.encode_record(subject, p, key, headers, None) for p in payloads]
        self._check_size(subject, max(encoded, key=len))
        p = next(self._round_robin) if key is None else self.partition_for(key)
        if self.config.discard == "new":
            self._check_room(len(encoded), sum(map(len, encoded)))
        partition = self.partitions[p]
        base_offset, seq = self._write(partition, encoded, subject, None, now_ns, uniform)
        await self._durable(partition, seq, now_ns)
        return BatchAck(self.name, [p] * len(encoded), range(base_offset, base_offset + len(encoded)), set())

    def _check_size(self, subject: str, record: bytes) -> None:
        if len(record) > self.max_message_bytes:
            raise MessageTooLargeError(
                f"message on {subject!r} is {len(record)} bytes encoded; "
                f"the maximum is {self.max_message_bytes}"
            )

    async def publish(self, messages: Sequence[Message], expect: Expect | None = None) -> BatchAck:
        """Append messages (already validated and routed to this stream) and return their acks.

        Messages bound for one partition are written as one batch: atomic, one CRC, one write.
        """
        now_ns = append_time_ns()
        count = len(messages)
        partitions = [0] * count
        offsets = [0] * count
        duplicates: dict[int, tuple[int, int] | int] = {}  # index -> where, or the batch original
        groups: dict[int, _Group] = {}
        # Unkeyed messages of one call stick to one partition (big atomic batches); the
        # partition rotates between calls, which spreads them evenly.
        unkeyed_partition = next(self._round_robin)
        batch_ids: dict[str, int] = {}
        encode = records.encode_record
        for i, message in enumerate(messages):
            explicit_id = message._id if message._id_number is None else None
            if explicit_id is not None:
                if explicit_id in batch_ids:
                    duplicates[i] = batch_ids[explicit_id]
                    continue
                seen = self.dedup.lookup(explicit_id, now_ns)
                if seen is not None:
                    duplicates[i] = seen
                    continue
                batch_ids[explicit_id] = i
            record = encode(message.subject, message.payload, message.key, message._headers, explicit_id)
            self._check_size(message.subject, record)
            key = message.key
            p = unkeyed_partition if key is None else self.partition_for(key)
            group = groups.get(p)
            if group is None:
                group = groups[p] = _Group()
            group.add(i, record, message.subject, explicit_id)
        if expect is not None and groups:  # all duplicates: a retry gets the original acks
            if len(groups) != 1:
                raise InvalidMessageError(
                    "a publish with expectations must put all its messages in one partition: "
                    "give them the same key"
                )
            ((p, group),) = groups.items()
            self._check_expectations(p, group.subjects[0], expect)
        if self.config.discard == "new":
            self._check_room(
                sum(len(g.encoded) for g in groups.values()),
                sum(sum(map(len, g.encoded)) for g in groups.values()),
            )
        written = []
        for p, group in groups.items():
            partition = self.partitions[p]
            base_offset, seq = self._write(
                partition, group.encoded, group.subjects, group.explicit_ids, now_ns, group.uniform
            )
            written.append((partition, seq))
            for n, i in enumerate(group.indexes):
                partitions[i] = p
                offsets[i] = base_offset + n
        for i, where in duplicates.items():
            if isinstance(where, int):
                partitions[i], offsets[i] = partitions[where], offsets[where]
            else:
                partitions[i], offsets[i] = where
        if self.config.durability == "always":
            # A duplicate's original may still be waiting for its fsync: it is acked no sooner.
            for where in duplicates.values():
                if not isinstance(where, int):
                    original = self.partitions[where[0]]
                    written.append((original, original.written))
            await asyncio.gather(*(partition.wait_durable(seq) for partition, seq in written))
        elif written:
            await self._durable(*written[0], now_ns)
        return BatchAck(self.name, partitions, offsets, set(duplicates))

    def _check_expectations(self, p: int, subject: str, expect: Expect) -> None:
        partition = self.partitions[p]
        if expect.last_offset is not None:
            actual = partition.next_offset - 1
            if actual != expect.last_offset:
                raise ConcurrencyConflictError(
                    f"stream {self.name!r} partition {p}: expected last offset "
                    f"{expect.last_offset}, but it is {actual}",
                    expected=expect.last_offset,
                    actual=actual,
                )
        if expect.last_subject_offset is not None:
            actual = partition.last_by_subject.get(subject, -1)
            if actual != expect.last_subject_offset:
                raise ConcurrencyConflictError(
                    f"stream {self.name!r} subject {subject!r}: expected last offset "
                    f"{expect.last_subject_offset}, but it is {actual}",
                    expected=expect.last_subject_offset,
                    actual=actual,
                )

    def _full(self, used: str, limit: str) -> StreamFullError:
        error = StreamFullError(f"stream {self.name!r} is full: {used} (discard=new rejects new messages)")
        error.limit = limit
        return error

    def _check_room(self, new_msgs: int, new_bytes: int) -> None:
        config = self.config
        if config.max_msgs is not None and self.total_msgs + new_msgs > config.max_msgs:
            raise self._full(f"{self.total_msgs} of {config.max_msgs} messages", "messages")
        new_bytes += records.HEADER_SIZE
        if config.max_bytes is not None and self.total_bytes + new_bytes > config.max_bytes:
            raise self._full(f"{self.total_bytes} of {config.max_bytes} bytes", "bytes")

    @property
    def total_msgs(self) -> int:
        return sum(p.total_msgs for p in self.partitions)

    @property
    def total_bytes(self) -> int:
        return sum(p.total_bytes for p in self.partitions)

    def apply_retention(self, now_ns: int) -> int:
        """Remove whole sealed segments that the limits allow removing; returns how many."""
        config = self.config
        removed = 0
        for partition in self.partitions:
            partition.rolled = False
        if config.max_age_s is not None:
            horizon = now_ns - int(config.max_age_s * 1e9)
            for partition in self.partitions:
                active = partition.active
                if active.size and active.last_timestamp_ns < horizon:
                    partition.roll()  # an idle active segment that has aged out entirely
                while len(partition.segments) > 1 and partition.segments[0].last_timestamp_ns < horizon:
                    partition.remove_oldest()
                    removed += 1
        if config.discard == "old":
            removed += self._remove_over_limit(config.max_msgs, lambda s: s.message_count)
            removed += self._remove_over_limit(config.max_bytes, lambda s: s.size)
        for partition in self.partitions:
            for i in reversed(partition.dead_segments()):
                partition.remove_segment(i)
                removed += 1
        return removed

    def _remove_over_limit(self, limit: int | None, measure: Callable[[Segment], int]) -> int:
        """Remove oldest segments while what is certainly newer still holds at least ``limit``.

        Newer than a segment means: later segments of its partition, and segments of other
        partitions whose oldest message is younger than its newest. Messages of other
        partitions that overlap it in time are not counted, so the newest ``limit`` messages
        always survive (more may, until the overlap ages out).
        """
        if limit is None:
            return 0
        removed = 0
        while True:
            candidates = [p for p in self.partitions if len(p.segments) > 1]
            if not candidates:
                return removed
            oldest = min(candidates, key=lambda p: p.segments[0].last_timestamp_ns)
            segment = oldest.segments[0]
            newer = sum(measure(s) for s in oldest.segments[1:]) + sum(
                measure(s)
                for p in self.partitions
                if p is not oldest
                for s in p.segments
                if s.first_timestamp_ns > segment.last_timestamp_ns
            )
            if newer < limit:
                return removed
            oldest.remove_oldest()
            removed += 1

    def purge(self) -> None:
        for partition in self.partitions:
            partition.purge()

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.partitions))
