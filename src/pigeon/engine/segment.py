"""One segment of a partition's log: a ``.log`` file of record batches and its sparse ``.index``.

The index holds one 16-byte entry ``(relative offset u32, position u32, timestamp_ns i64)``
per batch that starts at least ``INDEX_INTERVAL`` bytes after the previous entry, plus the
last batch of a sealed segment, so both "where is offset N" and "where is time T" are a
binary search and a short forward scan. Index entries are written lazily: recovery rebuilds
any the log has and the index lacks.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path

from ..errors import CorruptLogError, StorageError
from . import records
from .records import HEADER_SIZE, BatchHeader

INDEX_INTERVAL = 4096
INDEX_ENTRY = struct.Struct("<IIq")
READ_CHUNK = 1 << 20


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


class InvalidBatch(Exception):
    """A batch failed validation at ``position`` (internal: callers decide torn tail or corruption)."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


class Segment:
    __slots__ = (
        "_index_loaded",
        "_last_indexed_position",
        "_read_fd",
        "_unwritten_index",
        "base_offset",
        "directory",
        "first_timestamp_ns",
        "index_offsets",
        "index_path",
        "index_positions",
        "index_timestamps",
        "last_timestamp_ns",
        "log_path",
        "next_offset",
        "size",
        "write_fd",
    )

    def __init__(self, directory: Path, base_offset: int) -> None:
        self.directory = directory
        self.base_offset = base_offset
        # Named once: every append passes the path along (for its error message).
        self.log_path = directory / (segment_name(base_offset) + ".log")
        self.index_path = directory / (segment_name(base_offset) + ".index")
        self.next_offset = base_offset
        self.size = 0
        self.first_timestamp_ns = 0
        self.last_timestamp_ns = 0
        self.write_fd: int | None = None
        self._read_fd: int | None = None
        self.index_offsets = array("I")
        self.index_positions = array("I")
        self.index_timestamps = array("q")
        self._index_loaded = False
        self._last_indexed_position = -INDEX_INTERVAL
        self._unwritten_index = bytearray()

    @property
    def message_count(self) -> int:
        return self.next_offset - self.base_offset

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, base_offset: int) -> Segment:
        segment = cls(directory, base_offset)
        segment.write_fd = os.open(segment.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.close(os.open(segment.index_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        segment._index_loaded = True
        return segment

    @classmethod
    def open_sealed(cls, directory: Path, base_offset: int, next_offset: int) -> Segment:
        """A segment below the active one: trusted as sealed, nothing read but the index's ends
        and the header of the last batch."""
        segment = cls(directory, base_offset)
        segment.next_offset = next_offset
        segment.size = segment.log_path.stat().st_size
        ends = segment._index_ends()
        if ends is not None:
            first, last = ends
            segment.first_timestamp_ns, segment.last_timestamp_ns = first[2], last[2]
            segment._check_sealed_end(last)
        return segment

    def _check_sealed_end(self, last: tuple[int, int, int]) -> None:
        """A sealed segment ends exactly with the batch its index names last (sealing indexes
        it): a file cut short, or grown, is damage that reads would otherwise pass over as a
        gap. One header read per segment."""
        rel, position, _ = last
        problem = None
        with open(self.log_path, "rb") as f:
            f.seek(position)
            head = f.read(HEADER_SIZE)
        try:
            header = BatchHeader(head, 0) if len(head) == HEADER_SIZE else None
        except ValueError as exc:
            problem = f"its last batch at byte {position} is damaged ({exc})"
        else:
            if header is None or position + header.length != self.size:
                problem = f"it is {self.size} bytes but its last batch (at byte {position}) says otherwise"
            elif header.base_offset != self.base_offset + rel:
                problem = f"its last batch holds offset {header.base_offset}, not the indexed one"
        if problem is not None:
            raise CorruptLogError(
                f"{self.log_path} is damaged: {problem}; run `python -m pigeon.engine.repair`",
                path=str(self.log_path),
                position=position,
            )

    def _index_ends(self) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """The first and last index entries (relative offset, position, timestamp); None for an
        empty or missing index (an empty segment, or one recovery and repair rebuild)."""
        try:
            with open(self.index_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                length = f.tell() - f.tell() % INDEX_ENTRY.size
                if length == 0:
                    return None
                f.seek(0)
                first = INDEX_ENTRY.unpack(f.read(INDEX_ENTRY.size))
                f.seek(length - INDEX_ENTRY.size)
                last = INDEX_ENTRY.unpack(f.read(INDEX_ENTRY.size))
        except FileNotFoundError:
            return None
        return (int(first[0]), int(first[1]), int(first[2])), (int(last[0]), int(last[1]), int(last[2]))

    def load_index(self, valid_below: int | None = None) -> None:
        """Read the index file, keeping entries for positions below ``valid_below`` (default: all)."""
        self.index_offsets = array("I")
        self.index_positions = array("I")
        self.index_timestamps = array("q")
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            data = b""
        limit = self.size if valid_below is None else valid_below
        for rel, position, ts in INDEX_ENTRY.iter_unpack(data[: len(data) - len(data) % 16]):
            if position >= limit or (self.index_offsets and rel <= self.index_offsets[-1]):
                break
            self.index_offsets.append(rel)
            self.index_positions.append(position)
            self.index_timestamps.append(ts)
        if self.index_positions:
            self._last_indexed_position = self.index_positions[-1]
            self.first_timestamp_ns = self.index_timestamps[0]
        self._index_loaded = True

    def rewrite_index_file(self) -> None:
        """Make the index file hold exactly the in-memory entries (after recovery changed them)."""
        entries = b"".join(
            INDEX_ENTRY.pack(rel, pos, ts)
            for rel, pos, ts in zip(
                self.index_offsets, self.index_positions, self.index_timestamps, strict=True
            )
        )
        self.index_path.write_bytes(entries)
        self._unwritten_index.clear()

    def _ensure_index(self) -> None:
        if not self._index_loaded:
            self.load_index()

    def open_for_append(self) -> None:
        self.write_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)

    # -- writing ---------------------------------------------------------------------------

    def note_batch(self, position: int, header: BatchHeader) -> None:
        """Account for a batch at ``position`` (appended now or found by recovery)."""
        if position - self._last_indexed_position >= INDEX_INTERVAL:
            self._add_index_entry(header.base_offset, position, header.timestamp_ns)
        self.next_offset = header.base_offset + header.count
        self.size = position + header.length
        if header.timestamp_ns > self.last_timestamp_ns:
            self.last_timestamp_ns = header.timestamp_ns

    def _add_index_entry(self, offset: int, position: int, timestamp_ns: int) -> None:
        rel = offset - self.base_offset
        if not self.index_offsets:
            self.first_timestamp_ns = timestamp_ns
        self.index_offsets.append(rel)
        self.index_positions.append(position)
        self.index_timestamps.append(timestamp_ns)
        self._last_indexed_position = position
        self._unwritten_index += INDEX_ENTRY.pack(rel, position, timestamp_ns)

    def append(self, data: bytes, base_offset: int, count: int, timestamp_ns: int) -> None:
        assert self.write_fd is not None
        position = self.size
        write_whole(self.write_fd, data, position, self.log_path)
        if position - self._last_indexed_position >= INDEX_INTERVAL:
            self._add_index_entry(base_offset, position, timestamp_ns)
        self.size = position + len(data)
        self.next_offset = base_offset + count
        if timestamp_ns > self.last_timestamp_ns:
            self.last_timestamp_ns = timestamp_ns

    def flush_index(self) -> None:
        """Write pending index entries (cheap; called before fsync and at seal)."""
        if self._unwritten_index:
            fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                write_whole(fd, bytes(self._unwritten_index), os.fstat(fd).st_size, self.index_path)
            finally:
                os.close(fd)
            self._unwritten_index.clear()

    def seal_index(self, last_batch_position: int, last_batch_offset: int) -> None:
        """Make sure the last batch is indexed so its timestamp is the segment's newest."""
        self._ensure_index()
        if last_batch_position > (self.index_positions[-1] if self.index_positions else -1):
            self._add_index_entry(last_batch_offset, last_batch_position, self.last_timestamp_ns)
        self.flush_index()

    def truncate(self, position: int) -> None:
        """Drop everything from ``position`` on (recovery of a torn tail)."""
        os.truncate(self.log_path, position)
        self.size = position

    def close(self) -> None:
        for fd in (self.write_fd, self._read_fd):
            if fd is not None:
                os.close(fd)
        self.write_fd = self._read_fd = None

    def delete(self) -> None:
        self.close()
        for path in (self.log_path, self.index_path):
            path.unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------

    def _reader(self) -> int:
        if self._read_fd is None:
            self._read_fd = os.open(self.log_path, os.O_RDONLY)
        return self._read_fd

    def position_for_offset(self, offset: int) -> int:
        """Position of an indexed batch at or before ``offset`` (scan forward from there)."""
        self._ensure_index()
        i = bisect.bisect_right(self.index_offsets, offset - self.base_offset) - 1
        return 0 if i < 0 else self.index_positions[i]

    def position_for_time(self, timestamp_ns: int) -> int:
        """Position of an indexed batch older than ``timestamp_ns`` (scan forward from there)."""
        self._ensure_index()
        i = bisect.bisect_left(self.index_timestamps, timestamp_ns) - 1
        return 0 if i < 0 else self.index_positions[i]

    def batches(
        self, position: int, end: int | None = None, chunk: int = READ_CHUNK
    ) -> Iterator[tuple[bytes, int, BatchHeader]]:
        """Validated batches from ``position`` to ``end`` as (buffer, position in buffer, header).

        Raises `InvalidBatch` at the first batch that is short, malformed or fails its CRC.
        """
        fd = self._reader()
        end = self.size if end is None else end
        file_pos = position
        while file_pos < end:
            buf = os.pread(fd, min(chunk, end - file_pos), file_pos)
            if not buf:
                raise InvalidBatch(file_pos, "file ends before its recorded size")
            pos = 0
            while pos < len(buf):
                if len(buf) - pos < HEADER_SIZE:
                    if pos == 0 or file_pos + pos + HEADER_SIZE > end:
                        raise InvalidBatch(file_pos + pos, "truncated batch header")
                    break
                try:
                    header = BatchHeader(buf, pos)
                except ValueError as exc:
                    raise InvalidBatch(file_pos + pos, str(exc)) from None
                if pos + header.length > len(buf):
                    if file_pos + pos + header.length > end:
                        raise InvalidBatch(file_pos + pos, "batch runs past the end of the file")
                    if pos == 0:
                        buf = os.pread(fd, header.length, file_pos)
                        if len(buf) < header.length:
                            raise InvalidBatch(file_pos, "batch runs past the end of the file")
                    else:
                        break
                if not records.crc_ok(buf, pos, header):
                    raise InvalidBatch(file_pos + pos, "CRC32C mismatch")
                yield buf, pos, header
                pos += header.length
            file_pos += pos

    def corrupt_error(self, exc: InvalidBatch) -> CorruptLogError:
        data_dir = next((d for d in self.directory.parents if (d / "LOCK").exists()), self.directory)
        return CorruptLogError(
            f"corrupt record batch in {self.log_path} at byte {exc.position}: {exc.reason}. "
            f"Run `python -m pigeon.engine.repair {data_dir}` to salvage every valid batch.",
            path=str(self.log_path),
            position=exc.position,
        )


def write_whole(fd: int, data: bytes, position: int, path: Path) -> None:
    """Append ``data`` at ``position`` (the file's end) entirely, or leave the file as it was
    and raise `StorageError`: a full or failing disk must not leave half a batch or half an
    index entry that a later write would follow."""
    try:
        written = os.write(fd, data)
    except OSError as error:
        _undo(fd, position)
        raise StorageError(error.errno, f"cannot write to {path}: {error.strerror}") from None
    if written != len(data):
        _undo(fd, position)
        raise StorageError(
            errno.ENOSPC, f"cannot write to {path}: short write ({written} of {len(data)} bytes), disk full?"
        )


def _undo(fd: int, position: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, position)
