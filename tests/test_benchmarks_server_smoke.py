"""The server benchmark runs end to end (--quick) and reports every figure for both servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "server.py"
FIGURES = {
    "core_publish_msgs_per_s",
    "core_pubsub_delivered_msgs_per_s",
    "reqrep_p50_ms",
    "reqrep_p99_ms",
    "js_publish_async_msgs_per_s",
    "js_consume_ack_msgs_per_s",
}
TARGETS = {
    "js_publish_async_msgs_per_s",
    "js_consume_ack_msgs_per_s",
    "core_pubsub_delivered_msgs_per_s",
    "reqrep_p50_ms",
}


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_server_benchmark_quick_run_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", "--busy-poll", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    assert report["messages"] == 5000 and report["payload_bytes"] == 100
    for kind in ("pigeon", "nats_server", "ratios"):
        assert set(report[kind]) == FIGURES, kind
        for name, value in report[kind].items():
            assert _positive(value), f"{kind}.{name} = {value!r}"
    assert report["rounds"] == 1 and report["pigeon_busy_poll_us"] == 200
    for kind in ("pigeon", "nats_server"):
        busy = report["client_busy"][kind]
        assert set(busy) == {"js_publish_async", "js_consume_ack"}
        assert all(0 < share <= 1.5 for share in busy.values()), busy  # CPU time over wall time
    for kind in ("pigeon", "nats_server"):
        for name, (low, high) in report["spread"][kind].items():
            assert low <= report[kind][name] <= high, f"{kind}.{name}"
    assert set(report["targets"]) == TARGETS
    for name, target in report["targets"].items():
        assert isinstance(target["pass"], bool), name
        assert target["value"] == report["ratios"][name], name
    assert report["nats_server_version"].startswith("v2.")
