"""A stream: routing messages to partitions, deduplication, optimistic concurrency, limits."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True, slots=True)
class PubAck:
    """Where a published message was stored; ``duplicate`` when its id was seen in the window."""

    stream: str
    partition: int
    offset: int
    duplicate: bool = False


class BatchAck(Sequence[PubAck]):
    """The acks of a batch publish, built on access (batches can hold a million messages)."""

    __slots__ = ("_duplicates", "_offsets", "_partitions", "stream")

    def __init__(
        self, stream: str, partitions: list[int], offsets: list[int], duplicates: set[int]
    ) -> None:
        self.stream = stream
        self._partitions = partitions
        self._offsets = offsets
        self._duplicates = duplicates

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> PubAck:  # type: ignore[override]
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


class Stream:
    def __init__(self, config: StreamConfig, directory: Path, max_message_bytes: int) -> None:
        self.config = config
        self.name = config.name
        self.directory = directory
        self.max_message_bytes = max_message_bytes
        self.partitions: list[Partition] = []
        self.dedup = DedupWindow(config.dedup_window_s)
        self._round_robin = itertools.cycle(range(config.partitions))

    @classmethod
    def open(cls, config: StreamConfig, directory: Path, max_message_bytes: int) -> Stream:
        """Open every partition, recovering them. Blocking: call from a thread."""
        stream = cls(config, directory, max_message_bytes)
        stream.partitions = [
            Partition.open(directory / f"p{i}", config.name, i, config)
            for i in range(config.partitions)
        ]
        return stream

    def bind(self, executor: Executor) -> None:
        for partition in self.partitions:
            partition.bind(executor, self.dedup)
        self.dedup.sort()

    def partition_for(self, key: str) -> int:
        return partition_for_key(key.encode(), self.config.partitions)

    async def publish(self, messages: Sequence[Message], expect: Expect | None = None) -> BatchAck:
        """Append messages (already validated and routed to this stream) and return their acks.

        Messages bound for one partition are written as one batch: atomic, one CRC, one write.
        """
        now_ns = time.time_ns()
        count = len(messages)
        partitions = [0] * count
        offsets = [0] * count
        duplicates: set[int] = set()
        # partition -> (message indexes, encoded records, subjects, explicit ids)
        groups: dict[int, tuple[list[int], list[bytes], list[str], list[tuple[str, int]]]] = {}
        # Unkeyed messages of one call stick to one partition (big atomic batches); the
        # partition rotates between calls, which spreads them evenly.
        unkeyed_partition = next(self._round_robin)
        batch_ids: dict[str, int] = {}
        limit = self.max_message_bytes
        encode = records.encode_record
        dedup = self.dedup
        for i, message in enumerate(messages):
            explicit_id = message._id if message._id_number is None else None
            if explicit_id is not None:
                if explicit_id in batch_ids:
                    duplicates.add(i)
                    partitions[i] = -1 - batch_ids[explicit_id]  # resolved after the write
                    continue
                seen = dedup.lookup(explicit_id, now_ns)
                if seen is not None:
                    duplicates.add(i)
                    partitions[i], offsets[i] = seen
                    continue
                batch_ids[explicit_id] = i
            record = encode(message.subject, message.payload, message.key, message.headers, explicit_id)
            if len(record) > limit:
                raise MessageTooLargeError(
                    f"message on {message.subject!r} is {len(record)} bytes encoded; "
                    f"the maximum is {limit}"
                )
            key = message.key
            p = unkeyed_partition if key is None else self.partition_for(key)
            group = groups.get(p)
            if group is None:
                group = groups[p] = ([], [], [], [])
            group[0].append(i)
            group[1].append(record)
            group[2].append(message.subject)
            if explicit_id is not None:
                group[3].append((explicit_id, len(group[1]) - 1))
        if expect is not None:
            self._check_expectations(messages, groups, expect)
        if self.config.discard == "new":
            self._check_room(groups)
        sequences = []
        base_id = new_id_base(now_ns // 1_000_000)
        for p, (indexes, encoded, subjects, explicit_ids) in groups.items():
            partition = self.partitions[p]
            base_offset, seq = partition.append(encoded, subjects, explicit_ids, now_ns, base_id)
            base_id += len(encoded)
            sequences.append((partition, seq))
            for n, i in enumerate(indexes):
                partitions[i] = p
                offsets[i] = base_offset + n
        if any(self.partitions[p].rolled for p in groups):
            self.apply_retention(now_ns)
        for i in duplicates:
            if partitions[i] < 0:
                original = -1 - partitions[i]
                partitions[i], offsets[i] = partitions[original], offsets[original]
        if self.config.durability == "always":
            # A duplicate's original may still be waiting for its fsync: wait for it too.
            for i in duplicates:
                partition = self.partitions[partitions[i]]
                sequences.append((partition, partition.written))
            await asyncio.gather(*(p.wait_durable(seq) for p, seq in sequences))
        return BatchAck(self.name, partitions, offsets, duplicates)

    def _check_expectations(
        self,
        messages: Sequence[Message],
        groups: dict[int, tuple[list[int], list[bytes], list[str], list[tuple[str, int]]]],
        expect: Expect,
    ) -> None:
        if len(groups) != 1:
            raise InvalidMessageError(
                "a publish with expectations must put all its messages in one partition: "
                "give them the same key"
            )
        (p, (indexes, _, subjects, _)), = groups.items()
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
            subject = subjects[0]
            actual = partition.last_by_subject.get(subject, -1)
            if actual != expect.last_subject_offset:
                raise ConcurrencyConflictError(
                    f"stream {self.name!r} subject {subject!r}: expected last offset "
                    f"{expect.last_subject_offset}, but it is {actual}",
                    expected=expect.last_subject_offset,
                    actual=actual,
                )

    def _check_room(
        self, groups: dict[int, tuple[list[int], list[bytes], list[str], list[tuple[str, int]]]]
    ) -> None:
        new_msgs = sum(len(g[1]) for g in groups.values())
        new_bytes = sum(sum(map(len, g[1])) + records.HEADER_SIZE for g in groups.values())
        config = self.config
        if config.max_msgs is not None and self.total_msgs + new_msgs > config.max_msgs:
            raise StreamFullError(
                f"stream {self.name!r} is full: {self.total_msgs} of {config.max_msgs} messages "
                "(discard=new rejects new messages)"
            )
        if config.max_bytes is not None and self.total_bytes + new_bytes > config.max_bytes:
            raise StreamFullError(
                f"stream {self.name!r} is full: {self.total_bytes} of {config.max_bytes} bytes "
                "(discard=new rejects new messages)"
            )

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
            removed += self._remove_over_limit(config.max_msgs, lambda s: s.message_count, "total_msgs")
            removed += self._remove_over_limit(config.max_bytes, lambda s: s.size, "total_bytes")
        for partition in self.partitions:
            for i in reversed(partition.dead_segments()):
                partition.remove_segment(i)
                removed += 1
        return removed

    def _remove_over_limit(self, limit: int | None, measure: object, total: str) -> int:
        """Remove oldest segments while what remains still holds at least ``limit``."""
        if limit is None:
            return 0
        assert callable(measure)
        removed = 0
        while True:
            candidates = [p for p in self.partitions if len(p.segments) > 1]
            if not candidates:
                return removed
            oldest = min(candidates, key=lambda p: p.segments[0].last_timestamp_ns)
            if getattr(self, total) - measure(oldest.segments[0]) < limit:
                return removed
            oldest.remove_oldest()
            removed += 1

    def purge(self) -> None:
        for partition in self.partitions:
            partition.purge()

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.partitions))
