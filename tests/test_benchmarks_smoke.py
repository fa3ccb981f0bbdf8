"""The engine benchmark runs end to end on tiny sizes and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "engine.py"

NUMBERS = [
    "floor_file_append_msgs_per_s",
    "floor_raw_write_msgs_per_s",
    "publish_batched_msgs_per_s",
    "publish_batched_until_durable_msgs_per_s",
    "publish_batch_messages_msgs_per_s",
    "batched_vs_floor_ratio",
    "publish_awaited_msgs_per_s",
    "publish_always_concurrent_msgs_per_s",
    "publish_always_serial_msgs_per_s",
    "group_commit_speedup",
    "read_msgs_per_s",
    "fetch_msgs_per_s",
    "reopen_10m_s",
    "reopen_messages",
    "read_10m_peak_rss_mb",
    "open_baseline_rss_mb",
    "payload_bytes",
    "cpu_count",
]
SPREAD = [
    "floor_file_append_msgs_per_s",
    "floor_raw_write_msgs_per_s",
    "publish_batched_msgs_per_s",
    "publish_batched_until_durable_msgs_per_s",
    "publish_batch_messages_msgs_per_s",
    "publish_awaited_msgs_per_s",
    "publish_always_concurrent_msgs_per_s",
    "publish_always_serial_msgs_per_s",
    "read_msgs_per_s",
    "fetch_msgs_per_s",
    "reopen_10m_s",
    "read_10m_peak_rss_mb",
]
TARGETS = [
    "publish_batched_msgs_per_s",
    "batched_vs_floor_ratio",
    "publish_awaited_msgs_per_s",
    "group_commit_speedup",
    "read_msgs_per_s",
    "read_10m_peak_rss_mb",
    "reopen_10m_s",
]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_engine_benchmark_quick_run_reports_every_figure(tmp_path: Path) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--quick",
            "--json",
            "--messages",
            "3000",
            "--reopen-messages",
            "20000",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    for key in NUMBERS:
        assert _positive(report.get(key)), f"{key} = {report.get(key)!r}"
    assert report["payload_bytes"] == 100
    assert report["reopen_messages"] == 20000
    assert isinstance(report["python"], str) and report["python"]
    assert report["messages"] and all(_positive(n) for n in report["messages"].values())
    for key in SPREAD:
        spread = report["spread"][key]
        assert _positive(spread["min"]) and _positive(spread["max"]), key
        assert spread["min"] <= report[key] <= spread["max"], key
    assert set(report["targets"]) == set(TARGETS)
    for name, target in report["targets"].items():
        assert isinstance(target["pass"], bool), name
        assert target["value"] == report[name], name
    # Everything the run created lives under its own temporary folder, removed at the end.
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 30
