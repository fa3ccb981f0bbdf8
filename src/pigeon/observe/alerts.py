"""Alert thresholds on lag and on time behind, and the exit code they give a command.

Health (`pigeon.observe.health`) needs no threshold; these are for the numbers operators
still want a line for: "more than 10,000 behind" or "the oldest unprocessed message is over
five minutes old". A time behind that cannot be known (the transport cannot read the message
at the committed offset) is reported as unknown, never treated as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidConfigError
from .health import GroupHealth, Status

__all__ = ["Alert", "Thresholds", "check", "exit_code"]

AlertKind = Literal["lag", "time_behind", "health"]


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
    severity: Literal["warn", "error"]
    message: str


def check(
    health: GroupHealth,
    thresholds: Thresholds,
    time_behind_s: Mapping[int, float | None] | None = None,
) -> list[Alert]:
    """The alerts for one group: its health status, then each threshold a partition passes."""
    where = f"{health.stream}/{health.group}"
    alerts: list[Alert] = []
    for p in health.partitions:
        if p.status is not Status.OK:
            severity: Literal["warn", "error"] = "warn" if p.status is Status.WARN else "error"
            alerts.append(
                Alert(
                    health.stream,
                    health.group,
                    p.partition,
                    "health",
                    severity,
                    f"{where}[{p.partition}] {p.status.name}: {p.reason}",
                )
            )
        if thresholds.max_lag is not None and p.lag > thresholds.max_lag:
            alerts.append(
                Alert(
                    health.stream,
                    health.group,
                    p.partition,
                    "lag",
                    "error",
                    f"{where}[{p.partition}] lag {p.lag} is over {thresholds.max_lag}",
                )
            )
        if thresholds.max_time_behind_s is not None and p.lag:
            behind = (time_behind_s or {}).get(p.partition)
            if behind is None:
                alerts.append(
                    Alert(
                        health.stream,
                        health.group,
                        p.partition,
                        "time_behind",
                        "warn",
                        f"{where}[{p.partition}] time behind is unknown on this transport",
                    )
                )
            elif behind > thresholds.max_time_behind_s:
                alerts.append(
                    Alert(
                        health.stream,
                        health.group,
                        p.partition,
                        "time_behind",
                        "error",
                        f"{where}[{p.partition}] {behind:.1f}s behind, over {thresholds.max_time_behind_s}s",
                    )
                )
    return alerts


def exit_code(alerts: Sequence[Alert]) -> int:
    """0 without alerts, 1 when the worst is a warning (WARN, an unknown time behind), 2 for an
    error (ERR, STOP, STALL, REWIND, or a threshold passed)."""
    if any(a.severity == "error" for a in alerts):
        return 2
    return 1 if alerts else 0
