"""`pigeon lag` as a process: the table, JSON, health over --watch, and alert exit codes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from pigeon.engine import Engine, SharedGroupConfig, StreamConfig


def lag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", "lag", *args], capture_output=True, text=True, timeout=60
    )


async def make_folder(folder: Path) -> None:
    """A stream with 20 messages and a group that finished 5 of them, its consumer gone."""
    engine = await Engine.open(folder)
    try:
        await engine.create_stream(StreamConfig("orders", ("orders.>",)))
        for i in range(20):
            await engine.publish("orders.new", b"%d" % i)
        member = (await engine.shared_group("orders", SharedGroupConfig("billing"))).member()
        for delivery in await member.fetch(5, 1):
            await delivery.ack()
        await member.leave()
    finally:
        await engine.close()


def test_reads_a_data_folder_and_exits_by_the_thresholds(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    asyncio.run(make_folder(folder))
    calm = lag("orders", "billing", "--data", str(folder), "--json")
    assert calm.returncode == 0, calm.stderr
    reading = json.loads(calm.stdout)
    assert reading["lag"] == 15 and reading["partitions"][0]["committed"] == 5
    assert reading["partitions"][0]["time_behind_s"] >= 0
    over = lag("orders", "billing", "--data", str(folder), "--max-lag", "10", "--json")
    assert over.returncode == 2 and json.loads(over.stdout)["alerts"][0]["kind"] == "lag"
    table = lag("orders", "billing", "--data", str(folder))
    assert table.returncode == 0 and "orders / billing" in table.stdout and "15" in table.stdout


def test_watch_turns_a_stopped_group_into_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    asyncio.run(make_folder(folder))
    watched = lag("orders", "billing", "--data", str(folder), "--watch", "0.1", "--count", "3", "--json")
    statuses = [json.loads(line)["status"] for line in watched.stdout.splitlines()]
    assert statuses == ["OK", "OK", "ERR"]  # nothing moves and nobody consumes: STOP
    assert watched.returncode == 2


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    asyncio.run(make_folder(folder))
    for args in (["nope", "billing", "--data", str(folder)], ["orders", "nope", "--data", str(folder)]):
        done = lag(*args)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
