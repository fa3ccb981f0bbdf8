"""The bank example (examples/bank), run as its README says: commands, refusals, queries with
read-your-writes, time travel, and a projection run in its own process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "examples.bank", *args], cwd=ROOT, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def test_the_demo_separates_commands_and_queries(tmp_path: Path) -> None:
    after_rent, refused, before_rent, bob = _run("demo", "--data", str(tmp_path / "bank"))
    assert after_rent["account"] == {
        "account_id": "alice",
        "owner": "Alice",
        "balance": 40_00,
        "transactions": 2,
        "version": 3,
        "closed": False,
    }
    assert "cannot go below -5000" in str(refused["refused"])
    assert before_rent["balance"] == 120_00
    # Bob's first deposit was written at schema version 1 and upcast when read.
    assert bob["account"] == {
        "account_id": "bob",
        "owner": "Bob",
        "balance": 750,
        "transactions": 2,
        "version": 3,
        "closed": False,
    }


def test_fill_then_project_in_another_process(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    assert _run("fill", "--data", str(data), "--accounts", "3", "--commands", "50") == [
        {"accounts": 3, "commands": 50}
    ]
    db = tmp_path / "read.db"
    (done,) = _run("project", "--data", str(data), "--db", f"sqlite+aiosqlite:///{db}")
    assert done == {"caught_up": {"0": 53}}
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT sum(transactions) FROM bank_accounts").fetchone()
    assert count == 50
    # A second run has nothing left to do and applies nothing twice.
    assert _run("project", "--data", str(data), "--db", f"sqlite+aiosqlite:///{db}") == [done]
