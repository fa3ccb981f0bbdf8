"""The event-sourcing load benchmark runs end to end on small histories and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "es_load.py"


def test_es_load_benchmark_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--lengths", "100,1000", "--snapshot-every", "90", "--runs", "2"],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["lengths"] == [100, 1000] and result["snapshot_every"] == 90
    for kind in ("with_snapshots", "without_snapshots"):
        assert set(result[kind]) == {"100", "1000"}
        for figures in result[kind].values():
            assert figures["load_ms"] > 0 and len(figures["runs_ms"]) == 2
        assert result[kind]["100"]["ratio_to_first"] == 1.0
    # 100 and 1000 both leave 10 events after their last snapshot (every 90)
    assert [result["with_snapshots"][n]["replayed"] for n in ("100", "1000")] == [10, 10]
    assert [result["without_snapshots"][n]["replayed"] for n in ("100", "1000")] == [100, 1000]


def test_es_load_benchmark_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--lengths", "ten"], capture_output=True, timeout=60
    )
    assert done.returncode == 2 and b"--lengths takes integers" in done.stderr
