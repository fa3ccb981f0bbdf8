"""One run of the exactly-once recipe, to be killed at random by tests/test_exactly_once.py.

    python exactly_once_worker.py BROKER_DIR DB_URL EXPECTED CRASH_PROBABILITY SEED

A ledger handler (idempotent, SQL store) records each payment in the database and adds a
receipt to the outbox in the same transaction; a relay publishes the receipts. With
probability CRASH_PROBABILITY the process SIGKILLs itself right after a commit, before the
ack. It prints COMMITTED after each commit, and exits 0 once EXPECTED payments are
recorded and every receipt is published.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pigeon.app import App, Context, Flow, RetryPolicy
from pigeon.app.middleware import Idempotent
from pigeon.patterns.idempotency import SqlIdempotencyStore
from pigeon.patterns.outbox import Outbox, OutboxRelay
from pigeon.transport.embedded import EmbeddedOptions, EmbeddedTransport


async def main(folder: str, db_url: str, expected: int, crash_probability: float, seed: int) -> None:
    rng = random.Random(seed)
    engine = create_async_engine(db_url, connect_args={"timeout": 30})
    store, outbox = SqlIdempotencyStore(engine), Outbox(engine)
    transport = await EmbeddedTransport.open(f"file://{folder}", EmbeddedOptions(durability="always"))
    app = App(transport)

    async def crash_after_commit(ctx: Context, call_next: Any) -> Any:
        result = await call_next(ctx)  # the Idempotent layer inside has committed
        print("COMMITTED", flush=True)  # lets the test time its kills by progress
        if rng.random() < crash_probability:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    # A short lease, so that what a killed run had in flight comes back in a second; few in
    # flight and many attempts, since every kill counts a delivery of each message in flight
    # (as JetStream does) and the test kills a dozen times.
    @app.subscriber(
        stream="payments",
        group="ledger",
        ack_wait_s=1.0,
        flow=Flow(max_in_flight=10, fetch_batch=10),
        retry=RetryPolicy(max_attempts=100),
        middleware=[crash_after_commit, Idempotent(store)],
    )
    async def record(payment: dict[str, int], ctx: Context) -> None:
        await ctx.session.execute(
            text("INSERT INTO ledger (payment, amount) VALUES (:p, :a)"),
            {"p": payment["id"], "a": payment["amount"]},
        )
        await outbox.add(ctx.session, f"receipts.{payment['id']}", str(payment["id"]).encode())

    stop = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(outbox, transport, poll_interval_s=0.02).run(stop))
    async with app:
        while True:
            async with engine.connect() as connection:
                recorded = (await connection.execute(text("SELECT COUNT(*) FROM ledger"))).scalar_one()
            if recorded >= expected and await outbox.pending() == 0:
                break
            await asyncio.sleep(0.05)
    stop.set()
    await relay
    await transport.close()
    await engine.dispose()
    print("DONE", flush=True)


if __name__ == "__main__":
    folder, db_url, expected, probability, seed = sys.argv[1:6]
    asyncio.run(main(folder, db_url, int(expected), float(probability), int(seed)))
