"""Salvage every intact batch of a partition log that is damaged in the middle.

Usage: ``python -m pigeon.engine.repair DATA_DIR [--stream NAME] [--dry-run] [--json]``

The engine cuts off a torn tail by itself when it opens; damage anywhere else stops it
with a `CorruptLogError` that names this command. The repair:

* refuses to run while another process owns the data folder (the engine's ``LOCK``);
* reads every ``.log`` segment batch by batch and, past a damaged batch, resynchronises on
  the next position where a batch header parses and its CRC32C checks;
* keeps every intact batch at its offset. Recovery requires the offsets inside a segment
  to be contiguous, so batches after a lost range go to a new segment file named by their
  first offset (gaps between segments are accepted);
* keeps the original as ``<name>.log.corrupt-<UTC time>``, deletes the segment's
  ``.index`` and the partition's ``state.json``: the next open rescans the partition from
  its first segment and rebuilds every index, the per-subject state and the dedup ids;
* when the newest offsets were lost, leaves an empty segment named after the partition's
  last known end, so new messages never reuse an offset a consumer may already have seen;
* when every log is intact but what is derived from them is not (an index entry that names
  no batch, a sealed segment's index that does not end at its last batch, a ``state.json``
  that does not parse or points between batches), moves ``state.json`` aside as
  ``state.json.corrupt-<UTC time>``: the next open rescans the partition and writes every
  index and the checkpoint afresh from the logs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataDirLockedError, PigeonError, StreamNotFoundError
from .partition import STATE_FILE
from .records import HEADER_SIZE, MAGIC, BatchHeader, crc_ok
from .segment import INDEX_ENTRY, InvalidBatch, Segment, segment_name

PROG = "python -m pigeon.engine.repair"
_PARTITION_DIR = re.compile(r"p\d+")
_SEGMENT_FILE = re.compile(r"\d+\.log")

LostRange = tuple[int, int | None]


class NotADataFolderError(PigeonError):
    """The path is missing or is not a pigeon data folder."""


@dataclass
class SegmentReport:
    path: str  # relative to the data folder, as are all paths in a report
    batches_kept: int
    bytes_dropped: int
    # Inclusive offset ranges. A range lost at the end of a segment ends where the next
    # segment starts (an upper bound) or, when nothing bounds it, is open (None).
    lost_offsets: list[LostRange]
    pieces: list[str]  # the segment files that replace it, in offset order
    backup: str | None = None


@dataclass
class PartitionReport:
    path: str
    segments: int
    damaged: list[SegmentReport] = field(default_factory=list)
    placeholder: str | None = None  # empty segment keeping new offsets above the lost ones
    # Logs intact, derived files not: why the indexes and the checkpoint are rebuilt.
    stale: list[str] = field(default_factory=list)
    checkpoint_backup: str | None = None


@dataclass
class RepairReport:
    data_dir: str
    dry_run: bool
    partitions: list[PartitionReport]

    @property
    def damaged(self) -> int:
        return sum(len(p.damaged) for p in self.partitions)

    @property
    def rebuilt(self) -> int:
        """Partitions whose logs were intact but whose indexes or checkpoint were not."""
        return sum(bool(p.stale) for p in self.partitions)


@dataclass(frozen=True, slots=True)
class _Batch:
    position: int
    length: int
    base: int
    next: int
    timestamp_ns: int


def repair(data_dir: str | os.PathLike[str], *, stream: str | None = None,
           dry_run: bool = False) -> RepairReport:
    """Repair every partition of ``data_dir`` (or of one stream). Blocking."""
    root = Path(data_dir)
    if not root.is_dir():
        raise NotADataFolderError(f"{root} does not exist or is not a folder")
    if not (root / "streams").is_dir():
        raise NotADataFolderError(f"{root} is not a pigeon data folder (it has no streams/)")
    lock = _lock(root)
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        partitions = [
            _repair_partition(root, directory, stamp, dry_run)
            for directory in _partition_dirs(root, stream)
        ]
    finally:
        os.close(lock)  # closing drops the flock
    return RepairReport(str(root), dry_run, partitions)


def _lock(root: Path) -> int:
    # The engine's own protocol: an exclusive flock on LOCK, which holds the owner's PID.
    fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DataDirLockedError(
            f"data folder {root} is in use by process {owner or 'unknown'}; "
            "stop it before repairing",
            pid=int(owner) if owner.isdigit() else None,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _partition_dirs(root: Path, stream: str | None) -> list[Path]:
    streams = root / "streams"
    # Like the engine, ignore a stream folder whose creation never finished.
    names = sorted(p.name for p in streams.iterdir() if (p / "stream.json").is_file())
    if stream is not None:
        if stream not in names:
            raise StreamNotFoundError(f"no stream named {stream!r} in {root}")
        names = [stream]
    found = []
    for name in names:
        parts = [p for p in (streams / name).iterdir()
                 if p.is_dir() and _PARTITION_DIR.fullmatch(p.name)]
        found += sorted(parts, key=lambda p: int(p.name[1:]))
    return found


def _repair_partition(root: Path, directory: Path, stamp: str, dry_run: bool) -> PartitionReport:
    bases = sorted(int(p.name[:-4]) for p in directory.iterdir() if _SEGMENT_FILE.fullmatch(p.name))
    # Offsets below the last checkpoint or below a segment's name were handed out: new
    # messages must start at or above them even if the batches that held them are gone.
    floor = max([_checkpoint_next_offset(directory), *bases], default=0)
    report = PartitionReport(str(directory.relative_to(root)), len(bases))
    plans: list[tuple[int, list[list[_Batch]]]] = []
    intact: dict[int, list[_Batch]] = {}
    end = 0
    for i, base in enumerate(bases):
        upper = bases[i + 1] if i + 1 < len(bases) else None
        segment = Segment(directory, base)
        size = segment.log_path.stat().st_size
        try:
            kept = _salvage(segment, size, upper)
        finally:
            segment.close()
        runs = _runs(kept)
        if runs:
            end = runs[-1][-1].next
        elif size == 0:
            end = base
        kept_bytes = sum(b.length for b in kept)
        if kept_bytes == size and len(runs) <= 1 and (not runs or runs[0][0].base == base):
            intact[base] = kept
            continue
        tail_dropped = (kept[-1].position + kept[-1].length if kept else 0) < size
        report.damaged.append(SegmentReport(
            path=str(segment.log_path.relative_to(root)),
            batches_kept=len(kept),
            bytes_dropped=size - kept_bytes,
            lost_offsets=_lost(base, runs, tail_dropped, upper),
            pieces=[segment_name(run[0].base) + ".log" for run in runs],
        ))
        plans.append((base, runs))
    if not report.damaged:
        report.stale = _stale_derived_files(root, directory, bases, intact)
        if report.stale and not dry_run:
            report.checkpoint_backup = _drop_checkpoint(root, directory, stamp)
        return report
    if end < floor:
        report.placeholder = str((directory / (segment_name(floor) + ".log")).relative_to(root))
    if dry_run:
        return report
    # First, so that an interrupted repair leaves a partition the engine rescans in full
    # rather than a checkpoint pointing into rewritten files.
    (directory / STATE_FILE).unlink(missing_ok=True)
    _fsync_dir(directory)
    for (base, runs), segment_report in zip(plans, report.damaged, strict=True):
        backup = _replace_segment(directory, base, runs, stamp)
        segment_report.backup = str(backup.relative_to(root))
    if report.placeholder is not None:
        os.close(os.open(root / report.placeholder, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    _fsync_dir(directory)
    return report


def _checkpoint_next_offset(directory: Path) -> int:
    try:
        value = json.loads((directory / STATE_FILE).read_bytes())["next_offset"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return value if isinstance(value, int) else 0


def _stale_derived_files(root: Path, directory: Path, bases: list[int],
                         intact: dict[int, list[_Batch]]) -> list[str]:
    """Why the indexes or the checkpoint of a partition whose logs are all intact cannot be
    trusted (empty when they can). An index entry is exactly what `Segment.note_batch` wrote
    for some batch; sealing indexes a segment's last batch; a checkpoint points at a batch
    boundary and holds that boundary's next offset."""
    problems = []
    for i, base in enumerate(bases):
        index = directory / (segment_name(base) + ".index")
        problem = _index_problem(index, base, intact[base], sealed=i + 1 < len(bases))
        if problem is not None:
            problems.append(f"{index.relative_to(root)}: {problem}")
    problem = _checkpoint_problem(directory / STATE_FILE, bases, intact)
    if problem is not None:
        problems.append(f"{(directory / STATE_FILE).relative_to(root)}: {problem}")
    return problems


def _index_problem(path: Path, base: int, batches: list[_Batch], *, sealed: bool) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None  # an index the next open writes anyway
    if len(data) % INDEX_ENTRY.size:
        return f"{len(data)} bytes is not a whole number of entries"
    written = {(b.base - base, b.position, b.timestamp_ns) for b in batches}
    previous = -1
    for n, entry in enumerate(INDEX_ENTRY.iter_unpack(data)):
        if entry not in written:
            return f"entry {n} names no batch of the log"
        if entry[1] <= previous:
            return f"entry {n} goes back"
        previous = entry[1]
    if sealed and batches and data and previous != batches[-1].position:
        return "it does not end with the sealed segment's last batch"
    return None


def _checkpoint_problem(path: Path, bases: list[int], intact: dict[int, list[_Batch]]) -> str | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        return f"unreadable ({exc})"
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = [k for k in ("segment", "position", "next_offset", "last_timestamp_ns", "subjects", "ids")
               if k not in data]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    segment, position, next_offset = data["segment"], data["position"], data["next_offset"]
    if not all(isinstance(v, int) for v in (segment, position, next_offset)):
        return "segment, position and next_offset must be integers"
    if segment not in intact:
        # Retention may have removed the checkpoint's segment (then all that is left is newer).
        return None if not bases or segment < bases[0] else f"segment {segment} is not in the folder"
    boundaries = {0: segment} | {b.position + b.length: b.next for b in intact[segment]}
    if boundaries.get(position) != next_offset:
        return f"position {position} and next offset {next_offset} are not a batch boundary of the log"
    return None


def _drop_checkpoint(root: Path, directory: Path, stamp: str) -> str | None:
    """Move the partition's checkpoint aside, so that the next open rescans every segment."""
    checkpoint = directory / STATE_FILE
    if not checkpoint.exists():
        return None
    backup = _backup_path(directory, STATE_FILE, stamp)
    os.replace(checkpoint, backup)
    _fsync_dir(directory)
    return str(backup.relative_to(root))


def _salvage(segment: Segment, size: int, upper: int | None) -> list[_Batch]:
    """Every intact batch the engine can place, in file order."""
    kept: list[_Batch] = []
    expected = segment.base_offset
    position = 0
    while position < size:
        try:
            for _buf, _pos, header in segment.batches(position, size):
                if not _fits(header, expected, upper):
                    raise InvalidBatch(position, "offsets out of order")
                kept.append(_Batch(
                    position, header.length, header.base_offset, header.next_offset, header.timestamp_ns
                ))
                expected = header.next_offset
                position += header.length
        except InvalidBatch as exc:
            position = _next_batch(segment.log_path, exc.position + 1, size, expected, upper)
    return kept


def _fits(header: BatchHeader, expected: int, upper: int | None) -> bool:
    # Recovery rejects offsets that go back or reach into the next segment; such a "batch"
    # is most likely one stored inside a damaged message's payload.
    return header.base_offset >= expected and (upper is None or header.next_offset <= upper)


def _next_batch(path: Path, start: int, size: int, expected: int, upper: int | None) -> int:
    """Position of the next intact, placeable batch at or after ``start`` (``size`` if none)."""
    magic = bytes([MAGIC])
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
        memoryview(data) as view,
    ):
        at = data.find(magic, start)
        while at != -1 and at + HEADER_SIZE <= size:
            try:
                header = BatchHeader(view, at)
            except ValueError:
                pass
            else:
                if (at + header.length <= size and _fits(header, expected, upper)
                        and crc_ok(view, at, header)):
                    return at
            at = data.find(magic, at + 1)
    return size


def _runs(kept: list[_Batch]) -> list[list[_Batch]]:
    """Kept batches split wherever offsets jump: each run becomes one segment file."""
    runs: list[list[_Batch]] = []
    for batch in kept:
        if runs and runs[-1][-1].next == batch.base:
            runs[-1].append(batch)
        else:
            runs.append([batch])
    return runs


def _lost(base: int, runs: list[list[_Batch]], tail_dropped: bool,
          upper: int | None) -> list[LostRange]:
    lost: list[LostRange] = []
    cursor = base
    for run in runs:
        if run[0].base > cursor:
            lost.append((cursor, run[0].base - 1))
        cursor = run[-1].next
    # How far a lost tail reached is known only up to where the next segment starts.
    if tail_dropped and (upper is None or upper > cursor):
        lost.append((cursor, None if upper is None else upper - 1))
    return lost


def _replace_segment(directory: Path, base: int, runs: list[list[_Batch]], stamp: str) -> Path:
    original = directory / (segment_name(base) + ".log")
    names = [segment_name(run[0].base) + ".log" for run in runs]
    source = os.open(original, os.O_RDONLY)
    try:
        for name, run in zip(names, runs, strict=True):
            with open(directory / (name + ".repair"), "wb") as out:
                for batch in run:
                    out.write(os.pread(source, batch.length, batch.position))
                out.flush()
                os.fsync(out.fileno())
    finally:
        os.close(source)
    backup = _backup_path(directory, original.name, stamp)
    os.link(original, backup)
    # The original's own name is replaced last: until then it still names the whole log.
    for name in sorted(names, key=lambda name: name == original.name):
        os.replace(directory / (name + ".repair"), directory / name)
    if original.name not in names:
        original.unlink()
    for name in {original.name, *names}:
        (directory / (name[:-4] + ".index")).unlink(missing_ok=True)
    return backup


def _backup_path(directory: Path, name: str, stamp: str) -> Path:
    backup = directory / f"{name}.corrupt-{stamp}"
    n = 0
    while backup.exists():  # never overwrite an earlier backup
        n += 1
        backup = directory / f"{name}.corrupt-{stamp}-{n}"
    return backup


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _show(lost: LostRange) -> str:
    first, last = lost
    if last is None:
        return f"{first} and up (count unknown)"
    return str(first) if first == last else f"{first}-{last}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def describe(report: RepairReport) -> str:
    """The human-readable summary: one paragraph per damaged segment, then a total."""
    dry = report.dry_run
    lines = []
    for partition in report.partitions:
        for s in partition.damaged:
            lost = ", ".join(map(_show, s.lost_offsets)) or "none"
            lines.append(f"{s.path}: kept {s.batches_kept} batches, dropped {s.bytes_dropped} "
                         f"bytes, lost offsets {lost}")
            pieces = ", ".join(s.pieces) or "no segment"
            if s.backup is None:
                lines.append(f"  would write {pieces}")
            else:
                lines.append(f"  wrote {pieces}; original kept as {Path(s.backup).name}")
        if partition.placeholder is not None:
            lines.append(f"  {'would create' if dry else 'created'} empty segment "
                         f"{Path(partition.placeholder).name} so new offsets follow the lost ones")
        lines.extend(partition.stale)
        if partition.damaged or partition.stale:
            lines.append(f"{partition.path}: {'would remove' if dry else 'removed'} {STATE_FILE}; "
                         "the next open rescans the partition and rebuilds its indexes")
    segments = sum(p.segments for p in report.partitions)
    where = f"{_count(segments, 'segment')} in {_count(len(report.partitions), 'partition')}"
    rebuilt = (
        f"; {_count(report.rebuilt, 'partition')} to rescan for damaged indexes or checkpoints"
        if report.rebuilt else ""
    )
    if not report.damaged and not report.rebuilt:
        lines.append(f"checked {where}: all intact, nothing to do")
    elif dry:
        lines.append(f"dry run: {report.damaged} of {where} need repair{rebuilt}; nothing changed")
    else:
        lines.append(f"repaired {report.damaged} of {where}{rebuilt}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Salvage every intact record batch of damaged pigeon segments."
    )
    parser.add_argument("data_dir", help="the engine's data folder")
    parser.add_argument("--stream", help="repair only this stream")
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        report = repair(args.data_dir, stream=args.stream, dry_run=args.dry_run)
    except PigeonError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: repair failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**asdict(report), "damaged": report.damaged, "rebuilt": report.rebuilt}, indent=2))
    else:
        print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
