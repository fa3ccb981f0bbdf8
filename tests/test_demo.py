"""The demo pipeline shows every pattern it claims to, on the embedded engine."""

from __future__ import annotations

from pathlib import Path

from app_helpers import until
from pigeon.demo import ORDERS_STREAM, OrderPipeline
from pigeon.message import Headers
from pigeon.transport import connect


async def test_the_demo_shows_retries_dead_letters_idempotency_and_a_projection(tmp_path: Path) -> None:
    transport = await connect(f"file://{tmp_path / 'broker'}")
    pipeline = OrderPipeline(transport, tmp_path, speed=4.0, seed=7)
    await pipeline.start()
    try:
        shown = ("replayed", "rejected", "billing_failures")
        assert await until(lambda: all(pipeline.counts[what] for what in shown), timeout=60), pipeline.counts
        peak = sum(p.lag for p in await transport.lag(ORDERS_STREAM, "shipping"))
    finally:
        await pipeline.stop()
    try:
        letters = await transport.read_dead_letters(ORDERS_STREAM, "billing")
        reasons = {letter.headers.get(Headers.ERROR_TYPE) for letter in letters}
        assert {"PoisonMessage", "Reject"} <= reasons, reasons
        assert pipeline.counts["billed"] > 0 and pipeline.counts["shipped"] > 0
        assert peak > 0, "the slow shipping group should fall behind during a burst"
        assert sum(pipeline.revenue.values()) > 0
        assert pipeline.counts["projected"] <= pipeline.counts["published"]
    finally:
        await transport.close()
