"""The workloads, timed the same way whatever the system: each returns its figures for one run.

Every message is 100 bytes of ASCII (text-only systems take it as it is). Latency payloads start
with a 20-digit ``perf_counter_ns`` stamp. Throughput runs on a fresh queue or stream each time;
consume workloads fill theirs first, untimed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .backlog import peak_rss_mb
from .load import PAYLOAD, Counter, fill, stamp_of, stamped
from .systems.base import System

E2E_SECONDS = 5.0  # how long the offered load lasts (fewer messages if --count is smaller)
E2E_WARMUP = 0.1  # the first tenth of the end-to-end messages is not counted
MAX_REQUESTS = 5_000  # enough for a p99.9 from five samples above it
QUIET_S = 30.0  # a consumer or subscriber that gets nothing for this long has lost messages

THROUGHPUT = ("msgs_per_s",)
PERCENTILES = ("p50_ms", "p99_ms", "p999_ms")


@dataclass(frozen=True)
class Sizes:
    count: int  # messages per throughput run
    runs: int
    rate: int  # offered load of the end-to-end run, messages per second
    backlog: int  # messages in the backlog whose memory is measured

    @property
    def requests(self) -> int:
        return min(self.count, MAX_REQUESTS)

    @property
    def e2e_messages(self) -> int:
        return max(10, min(self.count, int(self.rate * E2E_SECONDS)))


Measure = Callable[[System, Sizes], Awaitable[dict[str, float]]]


@dataclass(frozen=True)
class Workload:
    name: str
    figures: tuple[str, ...]
    higher_is_better: bool
    unit: str
    description: str
    measure: Measure


def percentiles_ms(latencies_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank p50, p99 and p99.9 in milliseconds."""
    ordered = sorted(latencies_ns)

    def rank(fraction: float) -> float:
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] / 1e6

    return {"p50_ms": rank(0.5), "p99_ms": rank(0.99), "p999_ms": rank(0.999)}


def _rate(count: int, start: float) -> dict[str, float]:
    return {"msgs_per_s": count / (time.perf_counter() - start)}


async def publish_awaited(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.durable() as queue:
        publish = queue.publish
        start = time.perf_counter()
        for _ in range(sizes.count):
            await publish(PAYLOAD)
        return _rate(sizes.count, start)


async def publish_pipelined(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.durable() as queue:
        start = time.perf_counter()
        await fill(queue, sizes.count)
        return _rate(sizes.count, start)


async def consume_ack(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.durable() as queue:
        await fill(queue, sizes.count)
        counter = Counter(sizes.count)
        start = time.perf_counter()
        await queue.consume(sizes.count, counter)
        result = _rate(sizes.count, start)
        counter.check("consume")
        return result


async def consume_ordered_batch(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.durable() as queue:
        await fill(queue, sizes.count)
        counter = Counter(sizes.count)
        start = time.perf_counter()
        await queue.consume_batches(sizes.count, counter)
        result = _rate(sizes.count, start)
        counter.check("ordered consume")
        return result


async def pubsub(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.core() as core:
        counter = Counter(sizes.count)
        await core.subscribe(counter)
        publish = core.publish
        start = time.perf_counter()
        for _ in range(sizes.count):
            await publish(PAYLOAD)
        await core.flush()
        try:
            await asyncio.wait_for(counter.done.wait(), QUIET_S)
        except TimeoutError:
            counter.check("pub/sub")
        return _rate(sizes.count, start)


async def request_reply(system: System, sizes: Sizes) -> dict[str, float]:
    async with system.core() as core:
        await core.serve_echo()
        clock = time.perf_counter_ns
        latencies = []
        for _ in range(sizes.requests):
            start = clock()
            reply = await core.request(PAYLOAD)
            latencies.append(clock() - start)
            if reply != PAYLOAD:
                raise RuntimeError(f"the reply was {reply[:40]!r}, not the request's payload")
        return percentiles_ms(latencies)


async def e2e_latency(system: System, sizes: Sizes) -> dict[str, float]:
    """Publish one message at a time at the offered rate while a consumer acks each one.

    Each payload carries the time it was due, not the time it was sent: a publisher that
    falls behind the offered load makes the latency grow instead of hiding it.
    """
    total, rate = sizes.e2e_messages, sizes.rate
    clock = time.perf_counter_ns
    latencies: list[int] = []

    def arrived(payload: bytes) -> None:
        latencies.append(clock() - stamp_of(payload))

    async with system.durable() as queue:
        consuming = asyncio.ensure_future(queue.consume(total, arrived))
        try:
            start = clock()
            for i in range(total):
                due = start + i * 1_000_000_000 // rate
                wait = due - clock()
                if wait > 0:
                    await asyncio.sleep(wait / 1e9)
                await queue.publish(stamped(due))
            await asyncio.wait_for(asyncio.shield(consuming), QUIET_S)
        finally:
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
    return percentiles_ms(latencies[int(total * E2E_WARMUP) :])


async def backlog_memory(system: System, sizes: Sizes) -> dict[str, float]:
    return {"peak_rss_mb": await peak_rss_mb(system, sizes.backlog)}


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "publish_awaited",
            THROUGHPUT,
            True,
            "msgs/s",
            "durable publish, one at a time, each confirmed before the next",
            publish_awaited,
        ),
        Workload(
            "publish_pipelined",
            THROUGHPUT,
            True,
            "msgs/s",
            "durable publish, 1000 in flight or in one batch, then all confirmed",
            publish_pipelined,
        ),
        Workload(
            "consume_ack",
            THROUGHPUT,
            True,
            "msgs/s",
            "consume a filled queue, acknowledging every message",
            consume_ack,
        ),
        Workload(
            "consume_ordered_batch",
            THROUGHPUT,
            True,
            "msgs/s",
            "consume a filled queue in order, committing once per batch",
            consume_ordered_batch,
        ),
        Workload(
            "pubsub",
            THROUGHPUT,
            True,
            "msgs/s",
            "core publish/subscribe: messages delivered per second",
            pubsub,
        ),
        Workload(
            "request_reply",
            PERCENTILES,
            False,
            "ms",
            "request-reply round trips, one at a time, to an echo responder",
            request_reply,
        ),
        Workload(
            "e2e_latency",
            PERCENTILES,
            False,
            "ms",
            "publish-to-consume latency under a fixed offered load",
            e2e_latency,
        ),
        Workload(
            "backlog_memory",
            ("peak_rss_mb",),
            False,
            "MB",
            "peak RSS while a backlog is stored and then drained",
            backlog_memory,
        ),
    )
}
