"""``pigeon es`` as a process: rebuild a projection (equal to the one kept live), print an
aggregate's history, and one-line errors for the user's mistakes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTION = "examples.bank.readmodel:AccountsProjection"


def _es(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", "es", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _bank(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "examples.bank", *args], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def _rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM bank_accounts ORDER BY account_id").fetchall()


def test_rebuild_equals_the_live_projection(tmp_path: Path) -> None:
    data, live, rebuilt = tmp_path / "data", tmp_path / "live.db", tmp_path / "rebuilt.db"
    _bank("fill", "--data", str(data), "--accounts", "5", "--commands", "300")
    _bank("project", "--data", str(data), "--db", f"sqlite+aiosqlite:///{live}")
    for db in (rebuilt, live):  # into an empty database, and over the live one
        done = _es(
            "rebuild",
            "--data", str(data),
            "--stream", "bank",
            "--projection", PROJECTION,
            "--db", f"sqlite+aiosqlite:///{db}",
            "--yes",
            "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "projection": "accounts",
            "stream": "bank",
            "events": 305,
            "positions": {"0": 305},
        }
    assert _rows(rebuilt) == _rows(live) and len(_rows(live)) == 5


def test_history_prints_the_stored_events(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _bank("fill", "--data", str(data), "--accounts", "1", "--commands", "3")
    done = _es("history", "Account", "acc-0", "--data", str(data), "--stream", "bank", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["version"] for e in events] == [1, 2, 3, 4]
    assert events[0]["type"] == "AccountOpened" and events[0]["data"]["owner"] == "owner 0"
    people = _es("history", "Account", "acc-0", "--data", str(data), "--stream", "bank")
    assert people.stdout.startswith("v1  ") and "AccountOpened (schema 1)" in people.stdout


def test_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _bank("fill", "--data", str(data), "--accounts", "1", "--commands", "1")
    db = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    rebuild = ["rebuild", "--data", str(data), "--stream", "bank"]
    yes = ["--db", db, "--yes"]
    cases = [
        ([*rebuild, "--projection", "nocolon", *yes], "MODULE:OBJECT"),
        ([*rebuild, "--projection", "no_such_mod:X", *yes], "cannot import"),
        ([*rebuild, "--projection", "examples.bank.readmodel:Nope", *yes], "has no Nope"),
        ([*rebuild, "--projection", "examples.bank.domain:Account", *yes], "is not a pigeon.es.projection"),
        ([*rebuild, "--projection", "examples.bank.domain:registry", *yes], "is not a pigeon.es.projection"),
        (["rebuild", "--data", str(tmp_path / "none"), "--projection", PROJECTION, *yes], "no data folder"),
        (["rebuild", "--data", str(data), "--projection", PROJECTION, *yes], "no stream named 'events'"),
        ([*rebuild, "--projection", PROJECTION, "--db", "nonsense", "--yes"], "not a database URL"),
        ([*rebuild, "--projection", PROJECTION, "--db", db], "Refusing without --yes"),
        (["history", "Account", "nobody", "--data", str(data), "--stream", "bank"], "has no events"),
        (["history", "Account", "a.b", "--data", str(data), "--stream", "bank"], "subject token"),
    ]
    for args, expected in cases:
        done = _es(*args)
        assert done.returncode != 0, args
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
