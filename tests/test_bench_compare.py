"""`pigeon bench` without --url: the side-by-side comparison's shape, and its arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pigeon.bench import targets
from pigeon.bench.runner import PIGEON, _add_ratios
from pigeon.bench.stats import advantage, summarize
from pigeon.bench.systems import SYSTEMS, load_system
from pigeon.bench.workloads import WORKLOADS
from pigeon.testing.services import require_service


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_quick_comparison_reports_every_system_and_workload() -> None:
    for service in ("nats", "redis", "rabbitmq", "postgres"):
        require_service(service)
    done = _bench("--quick", "--count", "200", "--backlog", "2000", "--rate", "2000", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {*SYSTEMS, "run", "targets"}
    assert report["run"]["messages"] == 200 and report["run"]["backlog_messages"] == 2000
    for system in SYSTEMS:
        assert "error" not in report[system], (system, report[system])
        assert set(report[system]) == set(WORKLOADS)
        for name, workload in WORKLOADS.items():
            result = report[system][name]
            assert "error" not in result, (system, name, result)
            if result.get("value", 0) is None:
                assert result["reason"] and name in load_system(system).unsupported
                continue
            for figure in workload.figures:
                measured = result[figure]
                assert measured["value"] > 0 and measured["min"] <= measured["value"] <= measured["max"]
                ours = report[PIGEON][name][figure]["value"]
                expected = advantage(ours, measured["value"], higher_is_better=workload.higher_is_better)
                assert measured["pigeon_ratio"] == pytest.approx(expected, rel=1e-2, abs=1e-3)
    assert all(report[PIGEON][w] for w in WORKLOADS)  # pigeon has every workload
    assert {t["met"] for t in report["targets"]} <= {True, False}  # every target could be judged


def test_user_mistakes_are_one_line_errors() -> None:
    for args, said in (
        (("--systems", "pigeon_embedded,kafka"), "unknown --systems kafka"),
        (("--workloads", "nope"), "unknown --workloads nope"),
        (("--size", "64"), "--size goes with --url"),
        (("--url", "file:///tmp/x", "--quick"), "--quick is for the comparison"),
    ):
        done = _bench(*args)
        assert done.returncode == 2 and done.stderr.startswith("pigeon bench: "), done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr


def test_unreachable_system_is_reported_and_the_run_goes_on() -> None:
    done = _bench(
        "--quick",
        "--count",
        "50",
        "--json",
        "--systems",
        "redis_streams,floor_asyncio_queue",
        "--workloads",
        "publish_awaited",
        env={"PIGEON_BENCH_REDIS_STREAMS_URL": "redis://127.0.0.1:1/0"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "127.0.0.1:1" in report["redis_streams"]["error"]
    assert report["floor_asyncio_queue"]["publish_awaited"]["msgs_per_s"]["value"] > 0


def test_median_spread_and_ratio() -> None:
    assert summarize([3.0, 1.0, 2.0]) == {"value": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    assert summarize([1.0, 4.0])["value"] == 2.5
    with pytest.raises(ValueError):
        summarize([])
    assert advantage(200.0, 50.0, higher_is_better=True) == 4.0  # rates: ours / theirs
    assert advantage(0.5, 2.0, higher_is_better=False) == 4.0  # latencies: theirs / ours
    with pytest.raises(ValueError):
        advantage(0.0, 1.0, higher_is_better=True)


def _figure(value: float) -> dict[str, float]:
    return summarize([value])


def test_ratios_and_targets_from_figures() -> None:
    results = {
        PIGEON: {
            "publish_awaited": {"msgs_per_s": _figure(100_000.0)},
            "request_reply": {"p50_ms": _figure(0.1), "p99_ms": _figure(0.2), "p999_ms": _figure(0.4)},
        },
        "nats_jetstream": {
            "publish_awaited": {"msgs_per_s": _figure(4_000.0)},
            "request_reply": {"p50_ms": _figure(0.2), "p99_ms": _figure(0.4), "p999_ms": _figure(0.8)},
        },
        "redis_streams": {
            "publish_awaited": {"msgs_per_s": _figure(20_000.0)},
            "request_reply": {"value": None, "reason": "none"},
        },
        "rabbitmq": {"error": "unreachable"},
    }
    _add_ratios(results, ["publish_awaited", "request_reply"])
    assert results["redis_streams"]["publish_awaited"]["msgs_per_s"]["pigeon_ratio"] == 5.0
    assert results["nats_jetstream"]["request_reply"]["p99_ms"]["pigeon_ratio"] == 2.0
    assert results[PIGEON]["publish_awaited"]["msgs_per_s"]["pigeon_ratio"] == 1.0

    found = {(t["target"], t["workload"]): t for t in targets.check(results)}
    awaited = found["pigeon embedded 10x the best networked peer", "publish_awaited"]
    assert awaited["against"] == "redis_streams" and awaited["ratio"] == 5.0 and awaited["met"] is False
    consume = found["pigeon embedded 10x the best networked peer", "consume_ack"]
    assert consume["met"] is None and consume["reason"]
    results["redis_streams"]["publish_awaited"]["msgs_per_s"] = _figure(9_000.0)
    assert targets.check(results)[0]["met"] is True


def test_every_system_loads_and_names_its_missing_workloads() -> None:
    for name in SYSTEMS:
        system = load_system(name)
        assert system.name == name and set(system.unsupported) <= set(WORKLOADS)
        assert all(system.unsupported.values())  # a reason for each
    assert PIGEON in SYSTEMS and not load_system(PIGEON).unsupported
    assert set(targets.PEERS) | {PIGEON, "pigeon_serve", "floor_file_append"} <= set(SYSTEMS)
