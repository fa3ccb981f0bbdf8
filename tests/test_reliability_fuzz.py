"""Quick bad-input campaign: NATS port, admin API, registry, damaged files (benchmarks/reliability.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_campaigns import fuzz

pytestmark = pytest.mark.slow


def test_bad_input_crashes_nothing_and_damaged_files_are_never_served(tmp_path: Path) -> None:
    report = fuzz.run(tmp_path, examples=60, seed=11)
    assert report.failures == []
    figures = report.figures
    assert figures["nats_examples"] == 60
    assert figures["registry_requests"] == 60
    assert figures["admin_operations"] > 0 and figures["admin_requests"] > 0
    assert figures["server_tracebacks"] == 0
    assert "failed" not in figures["file_damage_outcomes"]
    assert "crashed" not in figures["file_damage_outcomes"]
