"""Flow control (on every transport) and rate limits: how much a subscriber holds and runs at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from app_helpers import until
from pigeon.app import App, Flow
from pigeon.app.middleware import RateLimit
from pigeon.errors import InvalidConfigError
from pigeon.message import Message
from pigeon.transport import StreamSpec, connect
from pigeon.transport.base import GroupKind


class Gauge:
    """Counts handler calls running at once, and the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0

    async def run(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1
            self.done += 1


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_max_in_flight_bounds_what_a_subscriber_holds(
    any_transport: Any, make_stream: Any, kind: GroupKind
) -> None:
    """More lanes than the bound: the bound, not the lanes, limits what runs at once. (A shared
    group's engine enforces it too, through max_ack_pending; an ordered group's does not.) An
    ordered group, whatever its concurrency, also runs one call per partition at a time."""
    stream, prefix = await make_stream(partitions=2)
    bound = 4
    app = App(any_transport)
    gauge = Gauge()
    seen: dict[int, list[int]] = {}  # partition -> message numbers, in the order handled

    @app.subscriber(stream=stream, group="g", kind=kind, flow=Flow(concurrency=8, max_in_flight=bound))
    async def handle(n: int, message: Message) -> None:
        seen.setdefault(message.partition, []).append(n)
        await gauge.run(0.02)

    for i in range(10 * bound):
        await app.publish(f"{prefix}.x", i, key=str(i))
    async with app:
        held = app.subscribers[0].in_flight
        assert await until(lambda: gauge.done == 10 * bound, timeout=20), gauge.done
    assert held.peak_messages <= bound, f"held {held.peak_messages} at once"
    assert gauge.peak <= bound, f"{gauge.peak} handler calls at once"
    assert gauge.peak > 1, "calls overlapped: the bound, not something else, kept them down"
    if kind == "ordered":
        assert len(seen) == 2 and gauge.peak == 2, "one call per partition at a time"
        assert all(numbers == sorted(numbers) for numbers in seen.values()), seen


async def test_max_in_flight_bytes_bounds_held_bytes_within_one_fetch(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    size, fetch_batch = 1000, 2
    limit = 2 * size + size // 2  # room for two messages and a half: a fetch starts below it
    app = App(any_transport)
    held_bytes: list[int] = []

    @app.subscriber(
        stream=stream,
        group="g",
        flow=Flow(max_in_flight_bytes=limit, fetch_batch=fetch_batch, max_in_flight=100),
    )
    async def handle(payload: bytes) -> None:
        held_bytes.append(app.subscribers[0].in_flight.bytes)
        await asyncio.sleep(0.01)

    for _ in range(30):
        await any_transport.publish(f"{prefix}.x", b"x" * size)
    async with app:
        held = app.subscribers[0].in_flight
        assert await until(lambda: len(held_bytes) == 30, timeout=20), len(held_bytes)
    # A fetch starts only below the limit and asks for at most fetch_batch messages.
    assert max(held_bytes) < limit + fetch_batch * size, max(held_bytes)
    assert held.peak_messages <= 4, held.peak_messages


async def test_concurrency_runs_that_many_handlers_at_once(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    lanes = 4
    app = App(any_transport)
    gauge = Gauge()

    @app.subscriber(stream=stream, group="g", flow=Flow(concurrency=lanes))
    async def handle(payload: bytes) -> None:
        await gauge.run(0.1)

    for i in range(5 * lanes):
        await any_transport.publish(f"{prefix}.x", b"%d" % i)
    async with app:
        assert await until(lambda: gauge.done == 5 * lanes, timeout=20), gauge.done
    assert gauge.peak == lanes


@pytest.mark.parametrize("url", ["memory://", "file://"])
async def test_a_rate_limit_spaces_the_calls(url: str, tmp_path: Path) -> None:
    """Four lanes share one bucket: 30 calls at 20 per second, burst 1, span at least 29/20 s.
    The limit is the App's own doing, so the in-process transports show it."""
    transport = await connect(url if url == "memory://" else f"file://{tmp_path / 'broker'}")
    stream, prefix = "jobs", "jobs"
    await transport.create_stream(StreamSpec(stream, (f"{prefix}.>",)))
    app = App(transport)
    calls: list[float] = []

    @app.subscriber(
        stream=stream, group="g", flow=Flow(concurrency=4), middleware=[RateLimit(per_second=20, burst=1)]
    )
    async def handle(payload: bytes) -> None:
        calls.append(time.monotonic())

    try:
        for i in range(30):
            await transport.publish(f"{prefix}.x", b"%d" % i)
        async with app:
            assert await until(lambda: len(calls) == 30, timeout=20), len(calls)
    finally:
        await transport.close()
    # Lower bound only: a loaded machine makes it slower, never faster.
    assert calls[-1] - calls[0] >= 1.4, calls[-1] - calls[0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("concurrency", 0),
        ("max_in_flight", -1),
        ("max_in_flight_bytes", 0),
        ("fetch_batch", 1.5),
        ("concurrency", True),
    ],
)
def test_flow_refuses_bad_values(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        Flow(**{field: value})
