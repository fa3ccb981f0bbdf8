"""What the campaigns share: their report shape, message payloads, append-only logs, RSS."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    """One campaign's figures and the invariants it found broken (empty: it passed)."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Problems worth a look that break none of the campaign's invariants (a repair that could
    # not recover a folder whose damage was detected, a client error without a JSON body).
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, problem: str) -> None:
        # Thousands of identical problems say nothing more than the first few and the count.
        if len(self.failures) < 50:
            self.failures.append(problem)

    def note(self, finding: str) -> None:
        if len(self.findings) < 20 and finding not in self.findings:
            self.findings.append(finding)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "figures": self.figures, "failures": self.failures, "findings": self.findings}


def payload_for(msg_id: str) -> bytes:
    """A payload that is a pure function of the message id, of varying length, so a reader
    can tell an intact message from a damaged or misplaced one without remembering it."""
    digest = hashlib.sha256(msg_id.encode()).hexdigest()
    return f"{msg_id}|{digest * (1 + int(digest[:2], 16) % 4)}".encode()


def payload_ok(msg_id: str | None, payload: bytes) -> bool:
    return msg_id is not None and payload == payload_for(msg_id)


class Appender:
    """An append-only line log. One ``os.write`` per line: a line that was written survives
    the SIGKILL of its writer (it is in the kernel), which is all a process crash needs."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(self, *fields: object) -> None:
        os.write(self.fd, (" ".join(map(str, fields)) + "\n").encode())


class LogTail:
    """Reads the complete lines appended to a file since the last call (a writer may be mid-line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.position = 0

    def new_lines(self) -> list[list[str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.position)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.position += end
        return [line.split() for line in chunk[:end].decode().splitlines()]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
