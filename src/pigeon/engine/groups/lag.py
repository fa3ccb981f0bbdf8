"""Lag of a group on one partition: how far behind the head its progress is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """``lag`` = ``head`` (next offset the stream will write) - ``committed`` (next offset the
    group has not finished). For shared groups the unfinished messages are split into
    ``pending`` (never delivered), ``in_flight`` (leased now) and ``waiting`` (failed, waiting
    for redelivery); ordered groups report their outstanding batch as ``in_flight``.
    """

    partition: int
    head: int
    committed: int
    lag: int
    pending: int
    in_flight: int
    waiting: int
    owner: str | None = None
