"""``pigeon bench``: pigeon side by side with the messaging systems on this machine, or one broker.

Without ``--url`` it runs the comparison (`pigeon.bench`): the same workloads of 100-byte
messages on embedded pigeon, ``pigeon serve``, the peers and the floors, each figure the median
of ``--runs`` runs, with ratios against embedded pigeon and the roadmap's targets.

With ``--url`` it measures that one broker: publish N messages into a fresh stream while a
shared group consumes them. Publishes are batched (``publish_batch``) and each batch's
acknowledgements awaited before the next, so the publish rate counts stored messages. Every
payload starts with the time it was made, so the consumer measures end-to-end latency: publish,
store, deliver. The stream is deleted at the end.
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

from ..bench import report, runner, targets
from ..bench.systems import SYSTEMS
from ..bench.workloads import WORKLOADS, Sizes
from ..message import Message, new_id
from ..transport.base import Consumer, ConsumerSpec, StreamSpec, Transport
from ._common import JsonOption, ack_all, fail, opened, run
from ._show import console, print_json, progress_bars

__all__ = ["bench"]

_STAMP = struct.Struct("<d")
_FETCH = 500
_STALL_S = 10.0
_COMPARE_COUNT = 100_000
_BROKER_COUNT = 10_000
_BACKLOG = 10_000_000
_QUICK = Sizes(count=1_000, runs=1, rate=1_000, backlog=20_000)


def bench(
    count: Annotated[
        int | None,
        typer.Option(min=1, help="Messages per workload (comparison: 100,000; --url: 10,000)."),
    ] = None,
    runs: Annotated[
        int | None, typer.Option(min=1, help="Runs per figure; the median is reported [3].")
    ] = None,
    systems: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated systems to compare (default: all): {', '.join(SYSTEMS)}."),
    ] = None,
    workloads: Annotated[
        str | None, typer.Option(help=f"Comma-separated workloads (default: all): {', '.join(WORKLOADS)}.")
    ] = None,
    backlog: Annotated[
        int | None, typer.Option(min=1, help="Messages in the backlog_memory workload [10,000,000].")
    ] = None,
    rate: Annotated[
        int | None, typer.Option(min=1, help="Offered load of e2e_latency, msgs/s [2,000].")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small smoke run: 1,000 messages, one run, a 20,000 backlog.")
    ] = False,
    size: Annotated[
        int | None, typer.Option(min=_STAMP.size, help="With --url: payload bytes [128].")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="With --url: messages per publish batch [100].")
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="With --url: partitions of the benchmark stream [1].")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Measure this one broker instead of comparing systems.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Compare pigeon with the messaging systems on this machine, or measure one broker (--url)."""
    if url is None:
        for name, given in (("--size", size), ("--batch", batch), ("--partitions", partitions)):
            if given is not None:
                fail(
                    "bench", f"{name} goes with --url (one broker); the comparison sends 100-byte messages", 2
                )
        sizes = Sizes(
            count=count or (_QUICK.count if quick else _COMPARE_COUNT),
            runs=runs or (_QUICK.runs if quick else 3),
            rate=rate or (_QUICK.rate if quick else 2_000),
            backlog=backlog or (_QUICK.backlog if quick else _BACKLOG),
        )
        plan = runner.Plan(
            _chosen("systems", systems, SYSTEMS), _chosen("workloads", workloads, WORKLOADS), sizes
        )
        _compare(plan, as_json)
        return
    options = {"--systems": systems, "--workloads": workloads, "--backlog": backlog, "--rate": rate}
    misplaced = [name for name, value in (options | {"--runs": runs}).items() if value is not None]
    if misplaced or quick:
        fail(
            "bench", f"{(misplaced or ['--quick'])[0]} is for the comparison, not with --url (one broker)", 2
        )
    result = run("bench", _bench(url, count or _BROKER_COUNT, size or 128, batch or 100, partitions or 1))
    if as_json:
        print_json(result)
    else:
        console().print(_table(result))


def _chosen(option: str, given: str | None, known: dict[str, Any]) -> list[str]:
    if given is None:
        return list(known)
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        fail(
            "bench",
            f"unknown --{option} {', '.join(unknown) or repr(given)}: choose from {', '.join(known)}",
            2,
        )
    return list(dict.fromkeys(names))


def _compare(plan: runner.Plan, as_json: bool) -> None:
    with progress_bars() as progress:
        task = progress.add_task("starting", total=plan.steps)

        def on_step(label: str, completed: int) -> None:
            progress.update(task, description=label, advance=completed)

        results = run("bench", runner.compare(plan, on_step))
    document = report.document(plan, results, targets.check(results))
    if as_json:
        print_json(document)
    else:
        console().print(report.tables(document, plan.systems))


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
