"""Quick soak: 20 seconds of pigeon serve at half its measured maximum rate (benchmarks/reliability.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_campaigns import soak

pytestmark = pytest.mark.slow


def test_half_rate_load_loses_nothing_and_a_slow_group_slows_no_one(
    tmp_path: Path,
) -> None:
    report = soak.run(tmp_path, minutes=1 / 3, log=lambda _: None)
    # Memory, latency and lag bounds are timings: judged by the 20-minute campaign, not by a
    # 20-second run on a shared machine. Everything else must hold here.
    timed = ("RSS grew", "fast group p99", "the fast group trailed")
    assert [f for f in report.failures if not f.startswith(timed)] == []
    figures = report.figures
    for name in (
        "max_rate_msgs_per_s",
        "rate_msgs_per_s",
        "samples",
        "rss_start_mb",
        "rss_end_mb",
        "rss_max_mb",
        "rss_growth_pct",
        "latency_p50_ms_first",
        "latency_p99_ms_first",
        "latency_p50_ms_last",
        "latency_p99_ms_last",
        "slow_lag_end",
    ):
        assert name in figures, name
    assert figures["messages_checked"] == figures["messages_published"] > 0
    assert figures["lost"] == 0
    assert figures["slow_lag_end"] > figures["fast_lag_max"]
