"""Effectively exactly once: at-least-once delivery + an idempotent consumer whose claim
commits with its effects + an outbox for its output gives one effect and one output per
message, however the process crashes (kill -9 from outside, and right after a commit)."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pigeon.patterns.idempotency import SqlIdempotencyStore
from pigeon.patterns.outbox import Outbox
from pigeon.testing.conformance import drain
from pigeon.transport.base import ConsumerSpec, StreamSpec
from pigeon.transport.embedded import EmbeddedOptions, EmbeddedTransport

WORKER = Path(__file__).with_name("exactly_once_worker.py")
PAYMENTS = 120


@pytest.mark.slow
async def test_one_effect_and_one_output_per_message_under_crashes(tmp_path: Path) -> None:
    folder, db_url = tmp_path / "broker", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    engine = create_async_engine(db_url)
    await SqlIdempotencyStore(engine).create_table()
    await Outbox(engine).create_table()
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE ledger (payment INTEGER, amount INTEGER)"))

    options = EmbeddedOptions(durability="always")
    broker = await EmbeddedTransport.open(f"file://{folder}", options)
    await broker.create_stream(StreamSpec("payments", ("payments.>",)))
    await broker.create_stream(StreamSpec("receipts", ("receipts.>",), dedup_window_s=3600))
    for n in range(PAYMENTS):
        await broker.publish("payments.in", b'{"id": %d, "amount": %d}' % (n, n * 10))
    await broker.close()

    # Outside kills are timed by progress, not by the clock: on a loaded machine a clock-timed
    # kill may land before the worker starts working, or after it has finished.
    rng = random.Random(20261128)
    outside_kills = self_kills = 0
    for _ in range(60):
        crash = outside_kills + self_kills < 12
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            str(folder),
            db_url,
            str(PAYMENTS),
            str(0.03 if crash else 0.0),
            str(rng.randrange(1 << 30)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            if crash:
                assert proc.stdout is not None
                for _ in range(rng.randint(1, 6)):
                    if not await asyncio.wait_for(proc.stdout.readline(), 120):
                        break
                await asyncio.sleep(rng.uniform(0, 0.02))
                if proc.returncode is None:
                    proc.kill()
                    await proc.communicate()
                    outside_kills += 1
                    continue
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            if proc.returncode == 0:
                assert b"DONE" in out
                break
            assert proc.returncode == -9, err.decode()[-3000:]
            self_kills += 1
        finally:
            if proc.returncode is None:  # a failed check must not leave the worker running
                proc.kill()
                await proc.wait()
    else:
        pytest.fail("the worker never finished")
    assert outside_kills + self_kills >= 10, "the crashes under test did happen"

    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT payment, amount FROM ledger ORDER BY payment"))).all()
    await engine.dispose()
    assert [tuple(r) for r in rows] == [(n, n * 10) for n in range(PAYMENTS)], "one effect per payment"

    broker = await EmbeddedTransport.open(f"file://{folder}", options)
    try:
        assert (await broker.stream_state("receipts")).messages == PAYMENTS, "one receipt per payment"
        reader = await broker.consumer("receipts", ConsumerSpec("audit"))
        receipts = sorted(int(r.message.payload) for r in await drain(reader, PAYMENTS))
        assert receipts == list(range(PAYMENTS))
        await reader.close()
        assert sum(p.lag for p in await broker.lag("payments", "ledger")) == 0
    finally:
        await broker.close()
