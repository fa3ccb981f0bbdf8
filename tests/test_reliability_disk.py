"""Quick disk-full campaign on an 8 MB tmpfs (benchmarks/reliability.py); needs root to mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reliability_campaigns import disk

pytestmark = pytest.mark.slow


def test_a_full_disk_fails_publishes_clearly_keeps_data_and_recovers(tmp_path: Path) -> None:
    if not disk.root_available():
        if os.environ.get("CI") == "true":
            pytest.fail("the disk-full campaign needs root (to mount a small tmpfs) under CI")
        pytest.skip("mounting a small tmpfs needs root")
    report = disk.run(tmp_path)
    assert report.failures == []
    assert report.figures["engine_messages_checked"] > 0 and report.figures["serve_messages_checked"] > 0
