"""``pigeon bench``: publish N messages into a fresh stream while a shared group consumes them.

Publishes are batched (``publish_batch``) and each batch's acknowledgements awaited before the
next, so the publish rate counts stored messages. Every payload starts with the time it was
made, so the consumer measures end-to-end latency: publish, store, deliver. The stream is
deleted at the end.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from ..message import Message, new_id
from ..transport.base import Consumer, ConsumerSpec, StreamSpec, Transport
from ._common import DEFAULT_URL, JsonOption, UrlOption, ack_all, opened, run
from ._show import console, print_json, progress_bars

__all__ = ["bench"]

_STAMP = struct.Struct("<d")
_FETCH = 500
_STALL_S = 10.0


def bench(
    count: Annotated[int, typer.Option(min=1, help="Messages to publish and consume.")] = 10_000,
    size: Annotated[int, typer.Option(min=_STAMP.size, help="Payload bytes per message.")] = 128,
    batch: Annotated[int, typer.Option(min=1, help="Messages per publish batch.")] = 100,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the benchmark stream.")] = 1,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Measure publish and consume rates and end-to-end latency on a broker."""
    result = run("bench", _bench(url, count, size, batch, partitions))
    if as_json:
        print_json(result)
    else:
        console().print(_table(result))


@dataclass
class _Run:
    count: int
    size: int
    batch: int
    start: float = field(default_factory=time.perf_counter)
    published_at: float = 0.0
    consumed_at: float = 0.0
    batch_latencies: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


async def _bench(url: str, count: int, size: int, batch: int, partitions: int) -> dict[str, Any]:
    suffix = new_id()[-12:]
    stream, subject = f"pigeon-bench-{suffix}", f"pigeon-bench.{suffix}"
    async with opened(url) as transport:
        await transport.create_stream(StreamSpec(stream, (subject,), partitions=partitions))
        try:
            consumer = await transport.consumer(stream, ConsumerSpec("bench", kind="shared"))
            try:
                state = _Run(count, size, batch)
                with progress_bars() as progress:
                    published = progress.add_task("published", total=count)
                    consumed = progress.add_task("consumed ", total=count)
                    await asyncio.gather(
                        _publish(transport, subject, state, progress, published),
                        _consume(consumer, state, progress, consumed),
                    )
            finally:
                await consumer.close()
        finally:
            await transport.delete_stream(stream)
    return _result(url, transport.name, state)


async def _publish(transport: Transport, subject: str, state: _Run, progress: Progress, task: TaskID) -> None:
    padding = b"x" * (state.size - _STAMP.size)
    sent = 0
    while sent < state.count:
        n = min(state.batch, state.count - sent)
        made = time.perf_counter()
        messages = [Message(subject, _STAMP.pack(made) + padding) for _ in range(n)]
        await transport.publish_batch(messages)
        state.batch_latencies.append(time.perf_counter() - made)
        sent += n
        progress.advance(task, n)
    state.published_at = time.perf_counter()


async def _consume(consumer: Consumer, state: _Run, progress: Progress, task: TaskID) -> None:
    quiet_since = time.perf_counter()
    while len(state.seen) < state.count:
        deliveries = await consumer.fetch(_FETCH, 1.0)
        now = time.perf_counter()
        if not deliveries:
            if now - quiet_since > _STALL_S:
                raise TimeoutError(
                    f"bench stalled: {len(state.seen)} of {state.count} consumed, none for {_STALL_S:.0f} s"
                )
            continue
        quiet_since = now
        for d in deliveries:
            # At least once: a redelivery is not a second message. By id, as RabbitMQ's shared
            # groups do not know offsets.
            if d.message.id not in state.seen:
                state.seen.add(d.message.id)
                state.latencies.append(now - _STAMP.unpack_from(d.message.payload)[0])
        await ack_all(deliveries)
        progress.update(task, completed=len(state.seen))
    state.consumed_at = time.perf_counter()


def _result(url: str, transport: str, state: _Run) -> dict[str, Any]:
    publish_s = state.published_at - state.start
    consume_s = state.consumed_at - state.start
    return {
        "url": url,
        "transport": transport,
        "messages": state.count,
        "size": state.size,
        "batch": state.batch,
        "publish": {
            "seconds": round(publish_s, 6),
            "msgs_per_s": round(state.count / publish_s, 1),
            "mb_per_s": round(state.count * state.size / publish_s / 1e6, 3),
            "batch_ack_ms": _percentiles(state.batch_latencies),
        },
        "consume": {
            "seconds": round(consume_s, 6),
            "msgs_per_s": round(state.count / consume_s, 1),
        },
        "end_to_end_ms": _percentiles(state.latencies),
    }


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def nearest_rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000

    return {f"p{p:g}": round(nearest_rank(p), 3) for p in (50, 90, 99)} | {
        "max": round(ordered[-1] * 1000, 3)
    }


def _table(result: dict[str, Any]) -> Table:
    table = Table(
        "",
        "msgs/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        title=(
            f"{result['messages']} messages of {result['size']} bytes on {result['url']} "
            f"(batches of {result['batch']})"
        ),
    )
    publish, consume, e2e = result["publish"], result["consume"], result["end_to_end_ms"]
    batch_ack = publish["batch_ack_ms"]
    table.add_row("publish (batch ack)", f"{publish['msgs_per_s']:,.0f}", *_cells(batch_ack))
    table.add_row("consume (end to end)", f"{consume['msgs_per_s']:,.0f}", *_cells(e2e))
    return table


def _cells(percentiles: dict[str, float]) -> list[str]:
    return [f"{percentiles[k]:.2f}" for k in ("p50", "p90", "p99", "max")]
