"""Helpers shared by the benchmarks: the Python floor, medians with their spread, sizes.

The floor is the least Python can do to put the benchmark's records in a file: build each
record in the timed loop exactly as ``records.encode_plain_records`` does
(``struct.pack('<IBH', length, 0, subject_length) + subject + payload``) and write them to a
plain unbuffered file, 100 records per write. Engine figures can then be read as a fraction
of what the interpreter allows on the machine they ran on.
"""

from __future__ import annotations

import math
import statistics
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pigeon.engine import records

FLOOR_CHUNK = 100  # records per write() in the floor
_RECORD = struct.Struct("<IBH")  # length, flags, subject length: records.encode_plain_records


def floor_file_append(path: Path, count: int, subject: str, payload: bytes) -> float:
    """Seconds to build ``count`` records in the loop and write them, 100 per write()."""
    subject_bytes = subject.encode()
    subject_len = len(subject_bytes)
    overhead = 3 + subject_len
    pack = _RECORD.pack
    with open(path, "wb", buffering=0) as f:
        write = f.write
        start = time.perf_counter()
        for _ in range(count // FLOOR_CHUNK):
            payloads = [payload] * FLOOR_CHUNK
            write(b"".join([pack(overhead + len(p), 0, subject_len) + subject_bytes + p for p in payloads]))
        seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def check_floor_records(subject: str, payload: bytes) -> None:
    """The floor must write exactly the bytes pigeon's encoder writes."""
    subject_bytes = subject.encode()
    header = _RECORD.pack(3 + len(subject_bytes) + len(payload), 0, len(subject_bytes))
    mine = header + subject_bytes + payload
    if [mine] != records.encode_plain_records(subject, [payload]):
        raise SystemExit("the floor's records differ from records.encode_plain_records")


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class Results:
    """Named figures: the median of their runs, with min, max and every run as the spread."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.spread: dict[str, dict[str, Any]] = {}

    def add(self, name: str, runs: Sequence[float], digits: int = 1) -> float:
        value = statistics.median(runs)
        self.values[name] = round(value, digits)
        self.spread[name] = {
            "min": round(min(runs), digits),
            "max": round(max(runs), digits),
            "runs": [round(r, digits) for r in runs],
        }
        return value


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]
