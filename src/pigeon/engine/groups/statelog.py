"""A group's durable state: an event log on the engine's own partition format, plus snapshots.

Every change a group makes durable (a commit, a delivery, an ack, a nack, a dead letter) is
an event appended to a private partition log, under the stream's durability policy. Events
recorded together (a fetched batch's deliveries, a batch ack) share one record and one write.
When the log grows, the group writes a snapshot of its whole state (atomically, fsynced) and
drops the log segments the snapshot covers. Opening replays the snapshot and the events
after it.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from crc32c import crc32c

from ..config import Durability, StreamConfig
from ..dedup import DedupWindow
from ..partition import Partition, write_atomically
from ..records import MAGIC, UNIFORM, encode_batch, encode_plain_records

EVENT = struct.Struct("<BIqq")  # kind, partition, offset, value

COMMIT = 1  # ordered: offset = next offset to read
DELIVER = 2  # one more delivery of offsets [offset, offset + value) (value 0: of offset alone)
ACK = 3
NACK = 4  # value = not-before time in ns (0: at once)
TERM = 5  # done without success: dead-lettered or dropped

SNAPSHOT_FILE = "snapshot.json"
_SUBJECT = "events"
_COMPACT_EVERY = 100_000

# Events are written as batches of one record holding the packed events: exactly what
# `records.encode_batch(base, ts, 0, encode_plain_records(_SUBJECT, [events]), UNIFORM)`
# builds (checked at import), framed here directly, without the lists and joins.
_SUBJECT_BYTES = _SUBJECT.encode()
_FRAME_HEAD = struct.Struct("<BBII")  # magic, attributes, length, crc
_CRC_START = 10  # the crc covers the attributes byte and everything after the crc field
# base offset, record count, timestamp, base id (high, low); record length, flags, subject
_FRAME_TAIL = struct.Struct(f"<QIqQQIBH{len(_SUBJECT_BYTES)}s")
_SUBJECT_LENGTH = len(_SUBJECT_BYTES)
_RECORD_OVERHEAD = 3 + _SUBJECT_LENGTH  # a record's length counts flags, subject length, subject
_ONE_RECORD = _RECORD_OVERHEAD + EVENT.size
_ONE_EVENT = struct.Struct(_FRAME_TAIL.format + EVENT.format.lstrip("<"))
_ONE_EVENT_BATCH = _CRC_START + _ONE_EVENT.size
_UNIFORM_CRC = crc32c(bytes([UNIFORM]))


def _frame(base_offset: int, timestamp_ns: int, events: bytes) -> bytes:
    """A batch of one record holding ``events``."""
    tail = _FRAME_TAIL.pack(
        base_offset, 1, timestamp_ns, 0, 0, _RECORD_OVERHEAD + len(events), 0, _SUBJECT_LENGTH, _SUBJECT_BYTES
    ) + events
    crc = crc32c(tail, _UNIFORM_CRC)
    return _FRAME_HEAD.pack(MAGIC, UNIFORM, _CRC_START + len(tail), crc) + tail


def _frame_one(
    base_offset: int, timestamp_ns: int, kind: int, partition: int, offset: int, value: int
) -> bytes:
    """A batch of one record holding one event (the settle path: one pack, one crc)."""
    tail = _ONE_EVENT.pack(
        base_offset, 1, timestamp_ns, 0, 0, _ONE_RECORD, 0, _SUBJECT_LENGTH, _SUBJECT_BYTES,
        kind, partition, offset, value,
    )
    return _FRAME_HEAD.pack(MAGIC, UNIFORM, _ONE_EVENT_BATCH, crc32c(tail, _UNIFORM_CRC)) + tail


def _check_framing() -> None:
    events = EVENT.pack(NACK, 3, 1 << 40, 123456789)
    expected = encode_batch(7, 1 << 60, 0, encode_plain_records(_SUBJECT, [events]), UNIFORM)
    one = _frame_one(7, 1 << 60, NACK, 3, 1 << 40, 123456789)
    if _frame(7, 1 << 60, events) != expected or one != expected:
        raise RuntimeError("the state log's batch framing no longer matches records.encode_batch")


_check_framing()


class StateLog:
    def __init__(self, directory: Path, partition: Partition) -> None:
        if partition.recent_by_subject is not None:  # what Partition.append_framed requires
            raise ValueError("a state log has no per-subject limit")
        self.directory = directory
        self._partition = partition
        self._pending: list[bytes] = []
        self._snapshotting = False
        # events that may still be written before a snapshot is due (see `maybe_snapshot`)
        self.until_snapshot = _COMPACT_EVERY
        self.always = partition.config.durability == "always"  # every write waits for its fsync

    @classmethod
    def open(
        cls, directory: Path, durability: Durability
    ) -> tuple[StateLog, dict[str, Any] | None, list[tuple[int, int, int, int]]]:
        """Open the log; returns it, the last snapshot's state and the events after it. Blocking."""
        config = StreamConfig(
            name="group-state", subjects=(_SUBJECT,), durability=durability, segment_bytes=4 << 20
        )
        partition = Partition.open(directory / "log", "group-state", 0, config)
        snapshot = None
        start = partition.first_offset
        try:
            data = json.loads((directory / SNAPSHOT_FILE).read_bytes())
            snapshot, start = data["state"], data["offset"]
        except FileNotFoundError:
            pass
        log = cls(directory, partition)
        events = list(log._replay(max(start, partition.first_offset)))
        log.until_snapshot = _COMPACT_EVERY - len(events)
        return log, snapshot, events

    def _replay(self, offset: int) -> Iterator[tuple[int, int, int, int]]:
        while True:
            messages = self._partition.fetch(offset, 1000)
            if not messages:
                return
            for message in messages:
                yield from EVENT.iter_unpack(message.payload)
            offset = messages[-1].offset + 1  # type: ignore[operator]

    def bind(self, executor: Executor) -> None:
        self._partition.bind(executor, DedupWindow(0))

    def record(self, kind: int, partition: int, offset: int, value: int = 0) -> None:
        """Queue an event; the next `flush` writes it together with the others queued."""
        self._pending.append(EVENT.pack(kind, partition, offset, value))

    def write(self, kind: int, partition: int, offset: int, value: int = 0) -> int:
        """Write one event now, after any queued (synchronously: it has reached the OS when
        this returns); returns the write sequence to pass to `wait_durable`.

        The settle path: `_frame_one` inlined, one pack and one crc.
        """
        if self._pending:
            self.record(kind, partition, offset, value)
            return self._write_pending()
        log = self._partition
        base = log.next_offset
        timestamp = time.time_ns()
        if timestamp < log.last_timestamp_ns:
            timestamp = log.last_timestamp_ns
        tail = _ONE_EVENT.pack(
            base, 1, timestamp, 0, 0, _ONE_RECORD, 0, _SUBJECT_LENGTH, _SUBJECT_BYTES,
            kind, partition, offset, value,
        )
        self.until_snapshot -= 1
        return log.append_framed(
            _FRAME_HEAD.pack(MAGIC, UNIFORM, _ONE_EVENT_BATCH, crc32c(tail, _UNIFORM_CRC)) + tail,
            base, 1, timestamp, _SUBJECT,
        )

    def _write_pending(self) -> int:
        """Write queued events as one record (synchronously); returns its write sequence."""
        log = self._partition
        if not self._pending:
            return log.written
        events = b"".join(self._pending)
        self.until_snapshot -= len(self._pending)
        self._pending.clear()
        base = log.next_offset
        timestamp = time.time_ns()
        if timestamp < log.last_timestamp_ns:
            timestamp = log.last_timestamp_ns
        return log.append_framed(_frame(base, timestamp, events), base, 1, timestamp, _SUBJECT)

    async def wait_durable(self, seq: int) -> None:
        """Wait until the write numbered ``seq`` is fsynced (group commit)."""
        await self._partition.wait_durable(seq)

    async def flush(self, *, sync: bool = False) -> None:
        """Write queued events as one record, then wait as the durability policy says.

        The write itself is synchronous (the OS's page cache; no loop iteration is lost), so a
        settle that returns has reached the OS. ``sync`` forces an fsync whatever the policy
        (used when a group is created).
        """
        seq = self._write_pending()
        if sync or self.always:
            await self._partition.wait_durable(seq)

    async def maybe_snapshot(self, capture: Callable[[], dict[str, Any]]) -> None:
        """When the log has grown, save the state ``capture`` returns and drop the covered log.

        The state, and the log position it covers, are taken in one step with no await in
        between, so no settle can fall between them; one snapshot runs at a time.
        """
        if self.until_snapshot > 0 or self._snapshotting:
            return
        self._snapshotting = True
        try:
            self._write_pending()
            offset = self._partition.next_offset
            data = json.dumps({"offset": offset, "state": capture()}, separators=(",", ":")).encode()
            self.until_snapshot = _COMPACT_EVERY
            await asyncio.get_running_loop().run_in_executor(
                None, write_atomically, self.directory / SNAPSHOT_FILE, data
            )
            partition = self._partition
            partition.roll()
            while len(partition.segments) > 1 and partition.segments[0].next_offset <= offset:
                partition.remove_oldest()
        finally:
            self._snapshotting = False

    async def close(self) -> None:
        await self.flush()
        await self._partition.close()
