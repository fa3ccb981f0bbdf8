"""Quick crash campaign: pigeon serve killed 5 times under mixed load (benchmarks/reliability.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_campaigns import crash

pytestmark = pytest.mark.slow


def test_sigkill_cycles_lose_nothing_and_never_redeliver_after_ack(tmp_path: Path) -> None:
    report = crash.run(tmp_path, cycles=5, seed=5, log=lambda _: None)
    assert report.failures == []
    figures = report.figures
    assert figures["cycles"] == 5
    assert figures["messages_checked"] >= figures["distinct_messages_acknowledged"] > 0
    assert figures["ordered_acks_confirmed"] > 0 and figures["shared_acks_confirmed"] > 0
    for invariant in (
        "lost",
        "duplicates_stored",
        "duplicates_after_ack",
        "offset_regressions",
        "corrupt_records",
    ):
        assert figures[invariant] == 0, invariant
