"""Consumer group health from observed offsets, in the manner of LinkedIn's Burrow.

A `HealthMonitor` never joins a group: it is fed lag snapshots (`Transport.lag`, or the
engine's `group_lag`) and keeps a sliding window of the last ``window`` samples per partition.
Burrow evaluates each offset *commit*; pigeon samples instead, so "the consumer is working" is
read from the snapshot itself: messages leased to members (``in_flight``) or waiting for a
redelivery mean someone is processing. Rules per partition, first match wins (docs/operations.md):

1. fewer than ``min_samples`` samples: OK, not complete yet;
2. the lag was zero in some sample of the window: OK (a consumer that caught up is healthy,
   even if it was rewound since, as in Burrow);
3. the committed offset went backwards between two samples: REWIND;
4. the committed offset did not move over the window: STALL if messages are in flight (the
   consumer works but makes no progress), else STOP (nobody is consuming);
5. the committed offset moved, but the lag never shrank between samples and grew overall: WARN
   (Burrow also warns on a flat lag; pigeon wants growth, so a consumer keeping pace is OK);
6. otherwise (the lag is coming down): OK.

A group is OK when every partition is, WARN when the worst is WARN, and ERR when any partition
is STOP, STALL or REWIND.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.groups.lag import PartitionLag
from ..errors import InvalidConfigError

__all__ = ["GroupHealth", "HealthMonitor", "HealthRules", "PartitionHealth", "Sample", "Status"]


class Status(enum.IntEnum):
    """The numeric value is what the ``pigeon_group_health_status`` gauge exports."""

    OK = 0
    WARN = 1
    ERR = 2
    STOP = 3
    STALL = 4
    REWIND = 5


_GROUP_ERRORS = (Status.STOP, Status.STALL, Status.REWIND)


@dataclass(frozen=True)
class Sample:
    timestamp: float
    committed: int
    head: int
    # Messages leased or waiting for redelivery when it was taken: our stand-in for Burrow's
    # "the consumer is committing", which tells STALL from STOP.
    active: bool = False

    @property
    def lag(self) -> int:
        return max(0, self.head - self.committed)


@dataclass(frozen=True)
class PartitionHealth:
    partition: int
    status: Status
    lag: int
    committed: int
    head: int
    reason: str


@dataclass(frozen=True)
class GroupHealth:
    stream: str
    group: str
    status: Status
    partitions: tuple[PartitionHealth, ...]
    complete: bool  # every partition has a full window

    def partition(self, number: int) -> PartitionHealth:
        return next(p for p in self.partitions if p.partition == number)


@dataclass(frozen=True)
class HealthRules:
    window: int = 10  # samples kept per partition
    min_samples: int = 3  # below this a partition is OK and the evaluation incomplete

    def __post_init__(self) -> None:
        for name in ("window", "min_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise InvalidConfigError(f"health {name} must be an integer of at least 2, not {value!r}")
        if self.min_samples > self.window:
            raise InvalidConfigError("health min_samples cannot exceed the window")


class HealthMonitor:
    def __init__(self, rules: HealthRules | None = None, clock: Callable[[], float] = time.time) -> None:
        self.rules = rules or HealthRules()
        self._clock = clock
        self._windows: dict[tuple[str, str], dict[int, deque[Sample]]] = {}

    def observe(
        self, stream: str, group: str, lags: Sequence[PartitionLag], now: float | None = None
    ) -> GroupHealth:
        """Record one sample per partition of ``lags`` and evaluate the group."""
        now = self._clock() if now is None else now
        windows = self._windows.setdefault((stream, group), {})
        for lag in lags:
            window = windows.get(lag.partition)
            if window is None:
                window = windows[lag.partition] = deque(maxlen=self.rules.window)
            window.append(Sample(now, lag.committed, lag.head, lag.in_flight > 0 or lag.waiting > 0))
        return self.evaluate(stream, group)

    def evaluate(self, stream: str, group: str) -> GroupHealth:
        windows = self._windows.get((stream, group), {})
        partitions = tuple(self._partition(p, list(windows[p])) for p in sorted(windows))
        worst = max((p.status for p in partitions), default=Status.OK)
        status = Status.ERR if worst in _GROUP_ERRORS else worst
        complete = bool(windows) and all(len(w) >= self.rules.window for w in windows.values())
        return GroupHealth(stream, group, status, partitions, complete)

    def groups(self) -> list[tuple[str, str]]:
        """The (stream, group) pairs observed so far."""
        return list(self._windows)

    def forget(self, stream: str, group: str) -> None:
        self._windows.pop((stream, group), None)

    def _partition(self, number: int, samples: list[Sample]) -> PartitionHealth:
        last = samples[-1]

        def health(status: Status, reason: str) -> PartitionHealth:
            return PartitionHealth(number, status, last.lag, last.committed, last.head, reason)

        if len(samples) < self.rules.min_samples:
            return health(Status.OK, f"collecting samples ({len(samples)} of {self.rules.min_samples})")
        if any(s.lag == 0 for s in samples):
            return health(Status.OK, "caught up within the window")
        pairs = list(itertools.pairwise(samples))
        for before, after in pairs:
            if after.committed < before.committed:
                return health(Status.REWIND, f"offset went back from {before.committed} to {after.committed}")
        if last.committed == samples[0].committed:
            if last.active:
                return health(Status.STALL, f"offset stuck at {last.committed} while messages are in flight")
            return health(Status.STOP, f"no progress from offset {last.committed} and nothing in flight")
        if all(after.lag >= before.lag for before, after in pairs) and last.lag > samples[0].lag:
            return health(Status.WARN, f"lag grew from {samples[0].lag} to {last.lag} over the window")
        return health(Status.OK, "consuming; the lag is not growing")
