"""Crash safety of projections: the bank example's projection process is killed with SIGKILL
at random points, again and again, until it catches up; the read model must then equal the one
computed from the full history (no event applied twice, none skipped)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from pigeon.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
STREAM = "bank"


def _bank(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "examples.bank", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _position(db: Path) -> int:
    if not db.exists():
        return 0
    # Closed at once: a reader left open would hold the file's shared lock and starve the projection.
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            rows = conn.execute("SELECT next_offset FROM pigeon_projection_positions").fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            return 0
    return 0 if not rows else int(rows[0][0])


async def _expected(data: Path) -> dict[str, tuple[Any, ...]]:
    """The read model computed straight from the stored events."""
    rows: dict[str, list[Any]] = {}
    async with await Engine.open(data) as engine:
        async for message in engine.read(STREAM, 0):
            account = message.subject.split(".")[2]
            kind = message.headers["Pigeon-Es-Type"]
            body = json.loads(message.payload)
            version = int(message.headers["Pigeon-Es-Version"])
            if kind == "AccountOpened":
                rows[account] = [account, body["owner"], 0, 0, version, 0]
                continue
            row = rows[account]
            row[2] += body["amount"] if kind == "MoneyDeposited" else -body["amount"]
            row[3] += 1
            row[4] = version
    return {k: tuple(v) for k, v in rows.items()}


@pytest.mark.slow
def test_sigkilled_projection_never_applies_twice_or_skips(tmp_path: Path) -> None:
    data, db = tmp_path / "data", tmp_path / "read.db"
    fill = _bank("fill", "--data", str(data), "--accounts", "8", "--commands", "3000", "--seed", "7")
    _, err = fill.communicate(timeout=300)
    assert fill.returncode == 0, err.decode()

    # Kills are timed by progress, not by the clock: on a loaded machine a clock-timed kill
    # may land before the process starts working, or after it has finished.
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    kills, positions_at_kill = 0, []
    for _ in range(60):
        project = _bank("project", "--data", str(data), "--db", f"sqlite+aiosqlite:///{db}", "--batch", "5")
        start = _position(db)
        crash = kills < 6 and start < 2500
        target = start + rng.randint(5, 400)
        try:
            if crash:
                while project.poll() is None and _position(db) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.03))
            if crash and project.poll() is None:
                project.send_signal(signal.SIGKILL)
                project.wait()
                kills += 1
                positions_at_kill.append(_position(db))
                continue
            project.wait(timeout=300)
        finally:
            _, err = project.communicate()
        if project.returncode == 0:
            break
        pytest.fail(f"the projection failed: {err.decode()}")
    else:
        pytest.fail(f"the projection did not catch up after {kills} kills")
    assert kills >= 3, "the kills must land while the projection works"
    assert len(set(positions_at_kill)) >= 2, f"kills landed at {positions_at_kill}"

    expected = asyncio.run(_expected(data))
    with sqlite3.connect(db) as conn:
        got = {
            row[0]: tuple(row)
            for row in conn.execute(
                "SELECT account_id, owner, balance, transactions, version, closed FROM bank_accounts"
            )
        }
    assert got == expected
    assert _position(db) == 3008  # 8 openings and 3000 movements, each applied once
