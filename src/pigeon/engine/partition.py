"""One partition of a stream: an ordered list of segments, its recovery, reads and fsyncs.

State that is expensive to rebuild (last offset per subject, recent message ids for
deduplication, the newest timestamp) is saved in ``state.json`` together with the log
position it covers. The file is written only after the log up to that position is
fsynced: at every segment roll and at a clean close. Opening therefore reads the
checkpoint and scans only the log written after it: nothing after a clean close, at most
the segments written since the last roll after a crash.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from ..errors import CorruptLogError, StorageError
from ..message import Message
from . import records
from .config import StartAt, StreamConfig
from .dedup import DedupWindow
from .records import MAGIC, BatchHeader
from .segment import INDEX_INTERVAL, InvalidBatch, Segment, write_whole

log = logging.getLogger("pigeon.engine")

STATE_FILE = "state.json"


class Partition:
    def __init__(self, directory: Path, stream: str, number: int, config: StreamConfig) -> None:
        self.directory = directory
        self.stream = stream
        self.number = number
        self.config = config
        self.segments: list[Segment] = []
        self.bases: list[int] = []
        self.next_offset = 0
        self.last_timestamp_ns = 0
        self.total_bytes = 0
        self.total_msgs = 0
        # subject -> offset of its newest message; with a per-subject limit also its recent offsets
        self.last_by_subject: dict[str, int] = {}
        self.recent_by_subject: dict[str, deque[int]] | None = (
            {} if config.max_msgs_per_subject else None
        )
        # explicit message ids seen, (id, offset, timestamp_ns), for the stream's dedup window
        self.recovered_ids: list[tuple[str, int, int]] = []
        self.written = 0
        self.synced = 0
        self._dirty: list[Segment] = []
        self._dir_version = 0  # bumped when files are created or removed
        self._dir_synced_version = 0
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._data_waiters: list[asyncio.Future[None]] = []
        self.append_listeners: list[Callable[[], None]] = []  # consumer groups waiting for data
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._io_lock = asyncio.Lock()
        self._seals: set[asyncio.Task[None]] = set()
        self.rolled = False  # set at each roll; the stream clears it after applying retention
        self._last_batch: tuple[int, int] = (0, 0)  # (position, base offset) in the active segment
        self._executor: Executor | None = None
        self._dedup: DedupWindow | None = None

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def first_offset(self) -> int:
        for segment in self.segments:
            if segment.message_count:
                return segment.base_offset
        return self.next_offset

    # -- opening and recovery ----------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, stream: str, number: int, config: StreamConfig) -> Partition:
        """Open (or create) the partition, recovering from a crash if there was one. Blocking."""
        partition = cls(directory, stream, number, config)
        directory.mkdir(parents=True, exist_ok=True)
        partition._recover()
        return partition

    def _load_checkpoint(self) -> dict[str, Any] | None:
        path = self.directory / STATE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CorruptLogError(
                f"unreadable checkpoint {path}: {exc}; delete it to rebuild it from the log",
                path=str(path),
                position=0,
            ) from None
        return data

    def _recover(self) -> None:
        bases = sorted(int(p.name[:-4]) for p in self.directory.glob("*.log"))
        checkpoint = self._load_checkpoint()
        if checkpoint is not None:
            self.next_offset = checkpoint["next_offset"]
            self.last_timestamp_ns = checkpoint["last_timestamp_ns"]
            self.last_by_subject = checkpoint["subjects"]
            if self.recent_by_subject is not None:
                self.recent_by_subject = {
                    s: deque(offsets) for s, offsets in checkpoint.get("recent", {}).items()
                }
            self.recovered_ids = [(e[0], e[1], e[2]) for e in checkpoint["ids"]]
        if not bases:
            self.segments = [Segment.create(self.directory, self.next_offset)]
            self.bases = [self.next_offset]
            self._dir_version += 1
            return

        start, position = 0, 0
        if checkpoint is not None:
            if checkpoint["segment"] in bases:
                start, position = bases.index(checkpoint["segment"]), checkpoint["position"]
            elif checkpoint["segment"] > bases[-1]:
                raise CorruptLogError(
                    f"segment {checkpoint['segment']} named by {self.directory / STATE_FILE} "
                    "is missing",
                    path=str(self.directory),
                    position=0,
                )
            else:  # retention removed the checkpoint's segment: everything left comes after it
                self.next_offset = bases[0]
        sealed_ends = {int(k): v for k, v in (checkpoint or {}).get("segments", {}).items()}
        for i in range(start):
            end = sealed_ends.get(bases[i], bases[i + 1])
            self.segments.append(Segment.open_sealed(self.directory, bases[i], end))
        for i in range(start, len(bases)):
            segment = Segment(self.directory, bases[i])
            file_size = segment.log_path.stat().st_size
            if i == start and position:
                if position > file_size:
                    raise CorruptLogError(
                        f"{segment.log_path} is {file_size} bytes but {STATE_FILE} says "
                        f"{position} bytes were stored and fsynced",
                        path=str(segment.log_path),
                        position=file_size,
                    )
                segment.size = position
                segment.next_offset = self.next_offset
                segment.last_timestamp_ns = self.last_timestamp_ns
                segment.load_index(valid_below=position)
            else:
                segment.load_index(valid_below=0)
                if bases[i] < self.next_offset:
                    self._raise_overlap(segment)
                # A gap before a segment is legitimate: per-subject retention removes
                # segments whose every message was superseded.
                self.next_offset = segment.next_offset = bases[i]
            is_last = i == len(bases) - 1
            self._last_batch = (0, segment.base_offset)
            self._scan(segment, file_size, is_last=is_last)
            if not is_last and segment.size:
                segment.seal_index(*self._last_batch)  # its newest timestamp must be indexed
            segment.rewrite_index_file()
            self.segments.append(segment)
        self.bases = [s.base_offset for s in self.segments]
        self.active.open_for_append()
        self.total_bytes = sum(s.size for s in self.segments)
        self.total_msgs = sum(s.message_count for s in self.segments)
        first = self.first_offset
        self._forget_before(first)
        self.recovered_ids = [entry for entry in self.recovered_ids if entry[1] >= first]

    def _raise_overlap(self, segment: Segment) -> None:
        raise CorruptLogError(
            f"{segment.log_path} starts at offset {segment.base_offset} but the log before it "
            f"already reaches {self.next_offset}",
            path=str(segment.log_path),
            position=0,
        )

    def _scan(self, segment: Segment, file_size: int, *, is_last: bool) -> None:
        position = segment.size
        try:
            for buf, pos, header in segment.batches(position, file_size):
                if header.base_offset != self.next_offset:
                    raise InvalidBatch(
                        position, f"batch has offset {header.base_offset}, expected {self.next_offset}"
                    )
                self._remember(header, records.record_facts(buf, pos, header))
                segment.note_batch(position, header)
                self._last_batch = (position, header.base_offset)
                self.next_offset = header.next_offset
                position += header.length
        except InvalidBatch as exc:
            if not is_last or _valid_batch_after(segment, exc.position + 1, file_size):
                raise segment.corrupt_error(exc) from None
            log.warning(
                "stream %s partition %d: truncated %d bytes of unacknowledged torn tail "
                "at %s byte %d (%s)",
                self.stream, self.number, file_size - exc.position, segment.log_path,
                exc.position, exc.reason,
            )
            segment.truncate(exc.position)
        segment.size = position

    def _remember(self, header: BatchHeader, facts: Iterable[tuple[str, str | None]]) -> None:
        offset = header.base_offset
        timestamp = header.timestamp_ns
        if timestamp > self.last_timestamp_ns:
            self.last_timestamp_ns = timestamp
        limit = self.config.max_msgs_per_subject
        recent = self.recent_by_subject
        last = self.last_by_subject
        for subject, explicit_id in facts:
            last[subject] = offset
            if recent is not None and limit is not None:
                offsets = recent.get(subject)
                if offsets is None:
                    offsets = recent[subject] = deque()
                offsets.append(offset)
                if len(offsets) > limit:
                    offsets.popleft()
            if explicit_id is not None:
                self.recovered_ids.append((explicit_id, offset, timestamp))
            offset += 1

    # -- appending ---------------------------------------------------------------------------

    def bind(self, executor: Executor, dedup: DedupWindow) -> None:
        self._executor = executor
        self._dedup = dedup
        dedup.add(self.number, self.recovered_ids)
        self.recovered_ids = []

    def append(
        self,
        encoded: list[bytes],
        subjects: list[str] | str,
        explicit_ids: list[tuple[str, int]] | None,
        timestamp_ns: int,
        base_id: int,
        uniform: bool = False,
    ) -> tuple[int, int]:
        """Write one batch; returns (base offset, write sequence for `wait_durable`).

        ``subjects`` is one subject per record, or a single subject shared by all. ``uniform``
        says every record has that one subject and no optional field.
        """
        base_offset = self.next_offset
        if timestamp_ns < self.last_timestamp_ns:
            timestamp_ns = self.last_timestamp_ns  # keep time monotonic for the time index
        batch = records.encode_batch(
            base_offset, timestamp_ns, base_id, encoded, uniform and records.UNIFORM
        )
        active = self.active
        if active.size and (
            active.size + len(batch) > self.config.segment_bytes
            or (self.config.segment_age_s is not None and self._segment_too_old(timestamp_ns))
        ):
            self.roll()
            active = self.active
        position = active.size
        active.append(batch, base_offset, len(encoded), timestamp_ns)
        self._last_batch = (position, base_offset)
        self.next_offset = base_offset + len(encoded)
        self.last_timestamp_ns = timestamp_ns
        self.total_bytes += len(batch)
        self.total_msgs += len(encoded)
        if isinstance(subjects, str) and self.recent_by_subject is None:
            self.last_by_subject[subjects] = self.next_offset - 1
        elif isinstance(subjects, str):
            self._remember_recent([subjects] * len(encoded), base_offset)
        elif self.recent_by_subject is None:
            last = self.last_by_subject
            for i, subject in enumerate(subjects):
                last[subject] = base_offset + i
        else:
            self._remember_recent(subjects, base_offset)
        if explicit_ids and self._dedup is not None:
            self._dedup.add(
                self.number, [(mid, base_offset + i, timestamp_ns) for mid, i in explicit_ids]
            )
        self.written += 1
        if not self._dirty or self._dirty[-1] is not active:
            self._dirty.append(active)
        for listener in self.append_listeners:
            listener()
        if self._data_waiters:
            waiters, self._data_waiters = self._data_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self.config.durability == "interval" and self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(
                self.config.fsync_interval_ms / 1000, self._start_flush
            )
        return base_offset, self.written

    def append_framed(
        self, batch: bytes, base_offset: int, count: int, timestamp_ns: int, subject: str
    ) -> int:
        """Write one batch the caller framed already; returns its write sequence.

        The private fast path of a group's state log (one small batch per settle): ``batch``
        must be laid out exactly as `records.encode_batch` lays it out, at ``base_offset``
        (the next offset), stamped ``timestamp_ns`` (not before the last batch), with
        ``count`` records all on ``subject`` and no explicit id, on a partition without a
        per-subject limit. The bookkeeping is `append`'s for such a batch.
        """
        if base_offset != self.next_offset or timestamp_ns < self.last_timestamp_ns:
            raise ValueError("append_framed: the batch does not continue this partition")
        active = self.segments[-1]
        size = len(batch)
        position = active.size
        config = self.config
        if position and (
            position + size > config.segment_bytes
            or (config.segment_age_s is not None and self._segment_too_old(timestamp_ns))
        ):
            self.roll()
            active = self.segments[-1]
            position = 0
        # Segment.append, inlined (a call less on every settle): write, index, account.
        write_whole(active.write_fd, batch, position, active.log_path)  # type: ignore[arg-type]
        if position - active._last_indexed_position >= INDEX_INTERVAL:
            active._add_index_entry(base_offset, position, timestamp_ns)
        active.size = position + size
        active.next_offset = self.next_offset = next_offset = base_offset + count
        active.last_timestamp_ns = self.last_timestamp_ns = timestamp_ns
        self._last_batch = (position, base_offset)
        self.total_bytes += size
        self.total_msgs += count
        self.last_by_subject[subject] = next_offset - 1
        self.written = written = self.written + 1
        dirty = self._dirty
        if not dirty or dirty[-1] is not active:
            dirty.append(active)
        if self.append_listeners or self._data_waiters:
            for listener in self.append_listeners:
                listener()
            waiters, self._data_waiters = self._data_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self._flush_timer is None and config.durability == "interval":
            self._flush_timer = asyncio.get_running_loop().call_later(
                config.fsync_interval_ms / 1000, self._start_flush
            )
        return written

    def _remember_recent(self, subjects: list[str], base_offset: int) -> None:
        assert self.recent_by_subject is not None and self.config.max_msgs_per_subject is not None
        limit = self.config.max_msgs_per_subject
        for i, subject in enumerate(subjects):
            self.last_by_subject[subject] = base_offset + i
            offsets = self.recent_by_subject.get(subject)
            if offsets is None:
                offsets = self.recent_by_subject[subject] = deque()
            offsets.append(base_offset + i)
            if len(offsets) > limit:
                offsets.popleft()

    def _segment_too_old(self, timestamp_ns: int) -> bool:
        assert self.config.segment_age_s is not None
        first_ts = self.active.index_timestamps[0] if self.active.index_timestamps else timestamp_ns
        return timestamp_ns - first_ts > self.config.segment_age_s * 1e9

    def roll(self) -> None:
        """Seal the active segment and start a new one; the seal's fsync runs in the background."""
        old = self.active
        if not old.size:
            return
        last_position, last_offset = self._last_batch
        old.seal_index(last_position, last_offset)
        new = Segment.create(self.directory, self.next_offset)
        self.segments.append(new)
        self.bases.append(new.base_offset)
        self._dir_version += 1
        self.rolled = True
        checkpoint = self._checkpoint(new, 0)
        task = asyncio.get_running_loop().create_task(self._seal(old, checkpoint))
        self._seals.add(task)
        task.add_done_callback(self._seals.discard)

    async def _seal(self, old: Segment, checkpoint: bytes) -> None:
        async with self._io_lock:
            fd = old.write_fd
            old.write_fd = None
            self._dirty = [s for s in self._dirty if s is not old]
            version = self._dir_version
            try:
                await self._in_thread(_seal_files, fd, old, self.directory, checkpoint)
            except OSError as error:
                # The checkpoint only shortens recovery (it scans the log without it); a full
                # disk must not turn the roll into a failure nobody sees.
                log.warning("sealing %s: %s", old.log_path, error)
                return
            self._dir_synced_version = version

    async def _close_under_lock(self, fd: int) -> None:
        async with self._io_lock:
            os.close(fd)

    def _checkpoint(self, segment: Segment, position: int) -> bytes:
        first = self.first_offset
        data: dict[str, Any] = {
            "version": 1,
            "segment": segment.base_offset,
            "position": position,
            "next_offset": segment.base_offset if position == 0 else self.next_offset,
            "last_timestamp_ns": self.last_timestamp_ns,
            "subjects": self.last_by_subject,
            "ids": self._ids_for_checkpoint(first),
            "segments": {str(s.base_offset): s.next_offset for s in self.segments[:-1]},
        }
        if self.recent_by_subject is not None:
            data["recent"] = {s: list(o) for s, o in self.recent_by_subject.items()}
        return json.dumps(data, separators=(",", ":")).encode()

    def _ids_for_checkpoint(self, first: int) -> list[tuple[str, int, int]]:
        if self._dedup is None:
            return []
        horizon = self.last_timestamp_ns - int(self.config.dedup_window_s * 1e9)
        return [e for e in self._dedup.entries_for(self.number) if e[2] >= horizon and e[1] >= first]

    # -- durability ----------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _start_flush(self) -> None:
        self._flush_timer = None
        if self._flush_task is None and self.synced < self.written:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self.synced < self.written:
                async with self._io_lock:
                    target = self.written
                    segments, self._dirty = self._dirty, []
                    try:
                        fds = []
                        for segment in segments:
                            segment.flush_index()
                            if segment.write_fd is not None:
                                fds.append(segment.write_fd)
                        version = self._dir_version
                        sync_dir = version != self._dir_synced_version
                        await self._in_thread(_fsync_all, fds, self.directory if sync_dir else None)
                    except OSError as error:
                        # A full or failing disk: those waiting for durability are told, rather
                        # than left waiting for ever; the next flush tries these segments again.
                        self._dirty = [s for s in segments if s not in self._dirty] + self._dirty
                        self._fail_durable_waiters(error)
                        return
                    self._dir_synced_version = version
                self.synced = target
                waiting, self._durable_waiters = self._durable_waiters, []
                for seq, waiter in waiting:
                    if seq <= target:
                        if not waiter.done():
                            waiter.set_result(None)
                    else:
                        self._durable_waiters.append((seq, waiter))
        finally:
            self._flush_task = None

    def _fail_durable_waiters(self, error: OSError) -> None:
        reason = error.strerror or str(error)
        failure = StorageError(error.errno, f"cannot make {self.directory} durable: {reason}")
        log.error("%s", failure)
        waiting, self._durable_waiters = self._durable_waiters, []
        for _, waiter in waiting:
            if not waiter.done():
                waiter.set_exception(failure)

    async def wait_durable(self, seq: int) -> None:
        """Return once the write numbered ``seq`` is fsynced (group commit: one fsync serves all)."""
        if self.synced >= seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((seq, waiter))
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())
        await waiter

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._seals:
            await asyncio.gather(*self._seals)
        if self._flush_task is not None:
            await self._flush_task
        async with self._io_lock:
            active = self.active
            last_position, last_offset = self._last_batch
            if active.size:
                active.seal_index(last_position, last_offset)
            checkpoint = self._checkpoint(active, active.size)
            await self._in_thread(_close_files, self, checkpoint)
        for waiter in self._data_waiters:
            if not waiter.done():
                waiter.set_result(None)  # the waiter sees no new data and returns False

    # -- reading -----------------------------------------------------------------------------

    def _segment_index_for(self, offset: int) -> int:
        return max(bisect.bisect_right(self.bases, offset) - 1, 0)

    def fetch(self, offset: int, max_messages: int, max_bytes: int | None = None) -> list[Message]:
        """Up to ``max_messages`` stored messages from ``offset`` on (fewer at the end of the log).

        Offsets below the first retained one start at the first retained message. Gaps left by
        per-subject retention are skipped.
        """
        out: list[Message] = []
        if offset >= self.next_offset or max_messages <= 0:
            return out
        offset = max(offset, self.first_offset)
        i = self._segment_index_for(offset)
        size = 0
        chunk = min(1 << 20, max(1 << 16, max_messages * 256))
        while i < len(self.segments) and len(out) < max_messages:
            segment = self.segments[i]
            i += 1
            if offset >= segment.next_offset:
                continue
            offset = max(offset, segment.base_offset)
            try:
                for buf, pos, header in segment.batches(segment.position_for_offset(offset), chunk=chunk):
                    if header.next_offset <= offset:
                        continue
                    messages = records.decode_records(
                        buf, pos, header, self.stream, self.number, offset
                    )
                    if self.recent_by_subject is not None:
                        messages = [m for m in messages if self._visible(m)]
                    if max_bytes is not None:
                        for m in messages:
                            size += len(m.payload)
                            if (out and size > max_bytes) or len(out) >= max_messages:
                                return out
                            out.append(m)
                    else:
                        out += messages
                    offset = header.next_offset
                    if len(out) >= max_messages:
                        break
            except InvalidBatch as exc:
                raise segment.corrupt_error(exc) from None
        del out[max_messages:]
        return out

    def _visible(self, message: Message) -> bool:
        assert self.recent_by_subject is not None and message.offset is not None
        offsets = self.recent_by_subject.get(message.subject)
        return bool(offsets) and offsets[0] <= message.offset  # type: ignore[index]

    def resolve(self, start: StartAt) -> int:
        """The offset a read starting at ``start`` begins at."""
        if start.kind == "earliest":
            return self.first_offset
        if start.kind == "latest":
            return self.next_offset
        if start.kind == "offset":
            return int(start.value)
        return self.offset_for_time(round(start.value * 1e6) * 1000)

    def offset_for_time(self, timestamp_ns: int) -> int:
        """The offset of the first message stored at or after ``timestamp_ns`` (or the end)."""
        for segment in self.segments:
            if segment.message_count and segment.last_timestamp_ns >= timestamp_ns:
                try:
                    for _buf, _pos, header in segment.batches(segment.position_for_time(timestamp_ns)):
                        if header.timestamp_ns >= timestamp_ns:
                            return header.base_offset
                except InvalidBatch as exc:
                    raise segment.corrupt_error(exc) from None
        return self.next_offset

    async def wait_for_data(self, offset: int, timeout: float | None) -> bool:
        """Wait until a message at ``offset`` or later exists; False on timeout."""
        if self.next_offset > offset:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._data_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._data_waiters:
                self._data_waiters.remove(waiter)
        return self.next_offset > offset

    # -- retention ---------------------------------------------------------------------------

    def remove_oldest(self) -> None:
        """Delete the oldest sealed segment (the caller decided retention allows it)."""
        self.remove_segment(0)

    def remove_segment(self, i: int) -> None:
        assert i < len(self.segments) - 1, "the active segment is never removed"
        segment = self.segments.pop(i)
        self.bases.pop(i)
        self.total_bytes -= segment.size
        self.total_msgs -= segment.message_count
        # A just-rolled segment may still be open for its seal, or in a flush running in a
        # thread: its fd is closed under the I/O lock, never under an fsync's feet.
        fd, segment.write_fd = segment.write_fd, None
        if fd is not None:
            task = asyncio.get_running_loop().create_task(self._close_under_lock(fd))
            self._seals.add(task)
            task.add_done_callback(self._seals.discard)
        segment.delete()
        self._dir_version += 1
        self._forget_before(self.first_offset)

    def _forget_before(self, first: int) -> None:
        if not self.last_by_subject or first == 0:
            return
        stale = [s for s, offset in self.last_by_subject.items() if offset < first]
        for subject in stale:
            del self.last_by_subject[subject]
        if self.recent_by_subject is not None:
            for subject, offsets in list(self.recent_by_subject.items()):
                while offsets and offsets[0] < first:
                    offsets.popleft()
                if not offsets:
                    del self.recent_by_subject[subject]

    def dead_segments(self) -> list[int]:
        """Indexes of sealed segments holding no message that per-subject retention keeps."""
        if self.recent_by_subject is None:
            return []
        live = set()
        for offsets in self.recent_by_subject.values():
            for offset in offsets:
                live.add(self._segment_index_for(offset))
        return [i for i in range(len(self.segments) - 1) if i not in live]

    def purge(self) -> None:
        """Remove every message; offsets continue where they were."""
        if self.active.size:
            self.roll()
        while len(self.segments) > 1:
            self.remove_segment(0)
        self.last_by_subject.clear()
        if self.recent_by_subject is not None:
            self.recent_by_subject.clear()


def _valid_batch_after(segment: Segment, start: int, end: int) -> bool:
    """Whether any intact batch starts after ``start``: then the damage is not a torn tail."""
    with open(segment.log_path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    magic = bytes([MAGIC])
    at = data.find(magic)
    while at != -1:
        try:
            header = BatchHeader(data, at)
            if at + header.length <= len(data) and records.crc_ok(data, at, header):
                return True
        except (ValueError, struct.error):
            pass
        at = data.find(magic, at + 1)
    return False


def _fsync_all(fds: list[int], directory: Path | None) -> None:
    for fd in fds:
        os.fsync(fd)
    if directory is not None:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written file left behind
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _seal_files(fd: int | None, old: Segment, directory: Path, checkpoint: bytes) -> None:
    if fd is not None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        with open(old.index_path, "rb+") as f:
            os.fsync(f.fileno())
    except FileNotFoundError:
        pass  # retention removed the segment while it was being sealed: nothing left to keep
    _fsync_dir(directory)
    write_atomically(directory / STATE_FILE, checkpoint)


def _close_files(partition: Partition, checkpoint: bytes) -> None:
    try:
        for segment in partition.segments:
            if segment.write_fd is not None:
                os.fsync(segment.write_fd)
            segment.flush_index()
        _fsync_dir(partition.directory)
        write_atomically(partition.directory / STATE_FILE, checkpoint)
    except OSError as error:
        # A full disk: what was written stays (recovery scans the log without a fresh
        # checkpoint), and closing must still let go of the files.
        log.warning("closing %s without a checkpoint: %s", partition.directory, error)
    finally:
        for segment in partition.segments:
            segment.close()
