"""Alert thresholds on lag and on time behind, and the exit code they give a command.

Health (`pigeon.observe.health`) needs no threshold; these are for the numbers operators
still want a line for: "more than 10,000 behind" or "the oldest unprocessed message is over
five minutes old". A time behind that cannot be known (the transport cannot read the message
at the committed offset) is reported as unknown, never treated as zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidConfigError
from .health import GroupHealth, PartitionHealth, Status

__all__ = ["Alert", "Thresholds", "check", "exit_code"]

AlertKind = Literal["lag", "time_behind", "health"]
Severity = Literal["warn", "error"]  # what exit_code maps to 1 and 2


@dataclass(frozen=True)
class Thresholds:
    max_lag: int | None = None
    max_time_behind_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_lag is not None and (
            isinstance(self.max_lag, bool) or not isinstance(self.max_lag, int) or self.max_lag < 0
        ):
            raise InvalidConfigError(f"max_lag must be a non-negative integer, not {self.max_lag!r}")
        seconds = self.max_time_behind_s
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise InvalidConfigError(f"max_time_behind_s must be a non-negative number, not {seconds!r}")


@dataclass(frozen=True)
class Alert:
    stream: str
    group: str
    partition: int | None
    kind: AlertKind
    message: str
    severity: Severity = "error"


def check(
    health: GroupHealth,
    thresholds: Thresholds,
    time_behind_s: Mapping[int, float | None] | None = None,
) -> list[Alert]:
    """The alerts for one group: for each partition its health status, then each threshold it passes."""
    behind = time_behind_s or {}
    return [
        Alert(
            health.stream,
            health.group,
            p.partition,
            kind,
            f"{health.stream}/{health.group}[{p.partition}] {text}",
            severity,
        )
        for p in health.partitions
        for kind, text, severity in _partition_alerts(p, thresholds, behind.get(p.partition))
    ]


def _partition_alerts(
    p: PartitionHealth, thresholds: Thresholds, behind: float | None
) -> Iterator[tuple[AlertKind, str, Severity]]:
    if p.status is not Status.OK:
        yield "health", f"{p.status.name}: {p.reason}", "warn" if p.status is Status.WARN else "error"
    if thresholds.max_lag is not None and p.lag > thresholds.max_lag:
        yield "lag", f"lag {p.lag} is over {thresholds.max_lag}", "error"
    if thresholds.max_time_behind_s is not None and p.lag:
        if behind is None:
            yield "time_behind", "time behind is unknown on this transport", "warn"
        elif behind > thresholds.max_time_behind_s:
            yield "time_behind", f"{behind:.1f}s behind, over {thresholds.max_time_behind_s}s", "error"


def exit_code(alerts: Sequence[Alert]) -> int:
    """0 without alerts, 1 when the worst is a warning (WARN, an unknown time behind), 2 for an
    error (ERR, STOP, STALL, REWIND, or a threshold passed)."""
    if any(a.severity == "error" for a in alerts):
        return 2
    return 1 if alerts else 0
