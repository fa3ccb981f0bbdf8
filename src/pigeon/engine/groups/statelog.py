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

from ..config import Durability, StreamConfig
from ..dedup import DedupWindow
from ..partition import Partition, write_atomically
from ..records import encode_plain_records

EVENT = struct.Struct("<BIqq")  # kind, partition, offset, value

COMMIT = 1  # ordered: offset = next offset to read
DELIVER = 2  # shared: one more delivery of (partition, offset)
ACK = 3
NACK = 4  # value = not-before time in ns (0: at once)
TERM = 5  # done without success: dead-lettered or dropped

SNAPSHOT_FILE = "snapshot.json"
_SUBJECT = "events"
_COMPACT_EVERY = 100_000


class StateLog:
    def __init__(self, directory: Path, partition: Partition) -> None:
        self.directory = directory
        self._partition = partition
        self._pending: list[bytes] = []
        self._snapshotting = False
        self._events_since_snapshot = 0

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
        log._events_since_snapshot = len(events)
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

    def _write_pending(self) -> int:
        """Write queued events as one record (synchronously); returns its write sequence."""
        partition = self._partition
        if not self._pending:
            return partition.written
        payload = b"".join(self._pending)
        self._events_since_snapshot += len(self._pending)
        self._pending.clear()
        _, seq = partition.append(
            encode_plain_records(_SUBJECT, [payload]), _SUBJECT, None, time.time_ns(), 0, True
        )
        return seq

    async def flush(self, *, sync: bool = False) -> None:
        """Write queued events as one record, then wait as the durability policy says.

        The write itself is synchronous (the OS's page cache; no loop iteration is lost), so a
        settle that returns has reached the OS. ``sync`` forces an fsync whatever the policy
        (used when a group is created).
        """
        seq = self._write_pending()
        if sync or self._partition.config.durability == "always":
            await self._partition.wait_durable(seq)

    async def maybe_snapshot(self, capture: Callable[[], dict[str, Any]]) -> None:
        """When the log has grown, save the state ``capture`` returns and drop the covered log.

        The state, and the log position it covers, are taken in one step with no await in
        between, so no settle can fall between them; one snapshot runs at a time.
        """
        if self._events_since_snapshot < _COMPACT_EVERY or self._snapshotting:
            return
        self._snapshotting = True
        try:
            self._write_pending()
            offset = self._partition.next_offset
            data = json.dumps({"offset": offset, "state": capture()}, separators=(",", ":")).encode()
            self._events_since_snapshot = 0
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
