"""The consumer-group benchmark runs end to end on tiny sizes and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "consumers.py"

RATES = [
    "floor_file_append_msgs_per_s",
    "ordered_consume_batch_commit_msgs_per_s",
    "ordered_consume_per_delivery_ack_msgs_per_s",
    "shared_consume_ack_msgs_per_s",
    "shared_consume_ack_batch_msgs_per_s",
    "push_shared_msgs_per_s",
    "e2e_publish_rate_msgs_per_s",
]
LATENCIES = ["e2e_latency_p50_ms", "e2e_latency_p99_ms", "e2e_latency_p999_ms", "e2e_latency_max_ms"]
TARGETS = ["ordered_consume_batch_commit_msgs_per_s", "shared_consume_ack_msgs_per_s"]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_consumers_benchmark_quick_run_reports_every_figure(tmp_path: Path) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", "--messages", "3000", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    for key in [*RATES, *LATENCIES, "ordered_vs_floor_ratio", "shared_vs_floor_ratio", "cpu_count"]:
        assert _positive(report.get(key)), f"{key} = {report.get(key)!r}"
    assert report["payload_bytes"] == 100
    assert report["repetitions"] == 1
    assert report["e2e_offered_rate_msgs_per_s"] == 20_000
    assert report["e2e_latency_p50_ms"] <= report["e2e_latency_p99_ms"] <= report["e2e_latency_max_ms"]
    messages = report["messages"]
    assert messages and all(_positive(n) for n in messages.values())
    assert messages["ordered_consume_batch_commit"] == messages["shared_consume_ack"] == 3000
    for key in [*RATES, *LATENCIES]:
        spread = report["spread"][key]
        assert spread["min"] <= report[key] <= spread["max"], key
        assert len(spread["runs"]) == 1, key
    assert set(report["targets"]) == set(TARGETS)
    for name, target in report["targets"].items():
        assert isinstance(target["pass"], bool), name
        assert target["value"] == report[name], name
    assert report["targets_total"] == 2
    # Everything the run created lives under its own temporary folder, removed at the end.
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 20
