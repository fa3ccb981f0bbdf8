"""A figure from several runs: the median, with the spread; and how two figures compare."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

_DIGITS = 3


def summarize(runs: Sequence[float]) -> dict[str, Any]:
    """The median of the runs as ``value``, with ``min``, ``max`` and every run."""
    if not runs:
        raise ValueError("a figure needs at least one run")
    return {
        "value": round(statistics.median(runs), _DIGITS),
        "min": round(min(runs), _DIGITS),
        "max": round(max(runs), _DIGITS),
        "runs": [round(r, _DIGITS) for r in runs],
    }


def advantage(ours: float, theirs: float, *, higher_is_better: bool) -> float:
    """How many times better ``ours`` is than ``theirs``: above 1 means ours is ahead, whether
    the figure is a rate (higher is better) or a latency or a size (lower is better)."""
    if ours <= 0 or theirs <= 0:
        raise ValueError(f"figures must be positive, not {ours} and {theirs}")
    return ours / theirs if higher_is_better else theirs / ours
