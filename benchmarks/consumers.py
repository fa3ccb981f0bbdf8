"""Consumer groups: ordered and shared consumption, push, end-to-end latency, against the floor.

Every throughput figure consumes 100-byte payloads on one subject from a one-partition
stream (durability "interval") filled beforehand with ``publish_many``; each repetition
consumes the whole stream with a fresh group, and the timer runs from the first fetch to the
last acknowledgement. Figures are the median of 3 repetitions (1 with ``--quick``):

* ``ordered_consume_batch_commit``: one member of an ordered group (commit "batch") fetches
  1000 at a time and acknowledges each fetch with ``member.ack_batch``;
  ``ordered_consume_per_delivery_ack`` is the same with ``await d.ack()`` on every delivery.
* ``shared_consume_ack``: one member of a shared group fetches 500 at a time and acknowledges
  every delivery with ``await d.ack()``; ``shared_consume_ack_batch`` uses ``ack_batch``.
* ``push_shared``: ``pigeon.engine.groups.push.consume`` on a shared group with a handler that
  does nothing (the push loop acks each delivery when the handler returns).
* ``e2e_latency``: a publisher task publishes one message at a time at a fixed offered rate
  (20,000 msgs/s) with its send time in the payload, on a fresh stream; one consumer task
  fetches from a shared group and acks each delivery. Latency = the time the fetch returned
  minus the send time; the first 10% of the messages are a warm-up and not counted.

The floor is measured in the same run, as in ``benchmarks/engine.py``: build every record
in the loop as the encoder does and write 100 per write() to a plain file.

Targets are reported, never asserted: the exit status is 0 whether they pass or not.

    python benchmarks/consumers.py [--json] [--quick] [--dir PATH]
    python benchmarks/consumers.py --profile ordered|ordered-per-delivery|shared|shared-batch|push
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import platform
import pstats
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Results, check_floor_records, floor_file_append, percentile, round_up
from pigeon.engine import Engine, OrderedGroupConfig, SharedGroupConfig, StreamConfig
from pigeon.engine.groups.delivery import Delivery
from pigeon.engine.groups.push import consume

PAYLOAD_BYTES = 100
PAYLOAD = bytes(range(PAYLOAD_BYTES))
SUBJECT = "bench.data"
STREAM = "bench"
DURABILITY = "interval"
PUBLISH_BATCH = 1000  # payloads per publish_many while filling the stream
ORDERED_FETCH = 1000
SHARED_FETCH = 500
MAX_ACK_PENDING = 10_000
PUSH_OUTSTANDING = 1000
E2E_RATE = 20_000  # offered messages per second
E2E_WARMUP = 0.1  # the fraction of messages not counted
E2E_SEND_TIME = struct.Struct("<q")  # perf_counter_ns at the publish call, first 8 payload bytes
FETCH_TIMEOUT_S = 5.0

TARGETS = {
    "ordered_consume_batch_commit_msgs_per_s": (">= 1,000,000", 1_000_000),
    "shared_consume_ack_msgs_per_s": (">= 300,000", 300_000),
}


@dataclass(frozen=True)
class Sizes:
    repetitions: int
    floor: int
    ordered: int
    shared: int
    push: int
    e2e_seconds: float

    @classmethod
    def choose(cls, quick: bool, messages: int | None) -> Sizes:
        if quick:
            sizes = cls(1, 2_000_000, 500_000, 200_000, 100_000, 1.5)
        else:
            sizes = cls(3, 5_000_000, 2_000_000, 500_000, 200_000, 3.0)
        if messages is not None:  # a tiny run (the smoke test): cap every count
            cap = max(messages, 1)
            sizes = replace(
                sizes,
                floor=round_up(min(sizes.floor, cap), 100),
                ordered=round_up(min(sizes.ordered, cap), PUBLISH_BATCH),
                shared=round_up(min(sizes.shared, cap), PUBLISH_BATCH),
                push=round_up(min(sizes.push, cap), PUBLISH_BATCH),
                e2e_seconds=min(sizes.e2e_seconds, max(0.2, cap / E2E_RATE)),
            )
        return sizes


# -- the stream and its groups -----------------------------------------------------------------


async def open_stream(path: Path) -> Engine:
    engine = await Engine.open(path)
    await engine.create_stream(StreamConfig(STREAM, ("bench.>",), partitions=1, durability=DURABILITY))
    return engine


async def fill(engine: Engine, count: int) -> None:
    for _ in range(count // PUBLISH_BATCH):
        await engine.publish_many(SUBJECT, [PAYLOAD] * PUBLISH_BATCH)


async def finish(engine: Engine, group: str, consumed: int, count: int) -> None:
    """Check the run consumed everything and left no lag; then remove its group."""
    if consumed != count:
        raise SystemExit(f"group {group} consumed {consumed} messages, expected {count}")
    lag = engine.group_lag(STREAM, group)
    if any(p.lag for p in lag):
        raise SystemExit(f"group {group} has lag {lag} after consuming everything")
    await engine.delete_group(STREAM, group)


Run = Callable[[Engine, str, int], Awaitable[float]]


async def ordered_consume(engine: Engine, group: str, count: int, *, batch_ack: bool) -> float:
    config = OrderedGroupConfig(group, commit="batch")
    member = await (await engine.ordered_group(STREAM, config)).join("m")
    fetch = member.fetch
    consumed = 0
    start = time.perf_counter()
    while consumed < count:
        deliveries = await fetch(ORDERED_FETCH, FETCH_TIMEOUT_S)
        if not deliveries:
            break
        if batch_ack:
            await member.ack_batch(deliveries)
        else:
            for d in deliveries:
                await d.ack()
        consumed += len(deliveries)
    seconds = time.perf_counter() - start
    await member.leave()
    await finish(engine, group, consumed, count)
    return seconds


async def shared_consume(engine: Engine, group: str, count: int, *, batch_ack: bool) -> float:
    config = SharedGroupConfig(group, max_ack_pending=MAX_ACK_PENDING)
    member = (await engine.shared_group(STREAM, config)).member("m")
    fetch = member.fetch
    consumed = 0
    start = time.perf_counter()
    while consumed < count:
        deliveries = await fetch(SHARED_FETCH, FETCH_TIMEOUT_S)
        if not deliveries:
            break
        if batch_ack:
            await member.ack_batch(deliveries)
        else:
            for d in deliveries:
                await d.ack()
        consumed += len(deliveries)
    seconds = time.perf_counter() - start
    await finish(engine, group, consumed, count)
    return seconds


async def push_shared(engine: Engine, group: str, count: int) -> float:
    config = SharedGroupConfig(group, max_ack_pending=MAX_ACK_PENDING)
    member = (await engine.shared_group(STREAM, config)).member("m")
    stop = asyncio.Event()
    handled = 0

    async def handler(_delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        if handled >= count:
            stop.set()

    start = time.perf_counter()
    # Returns once stopped and every running handler (and its ack) finished.
    await asyncio.wait_for(consume(member, handler, max_outstanding=PUSH_OUTSTANDING, stop=stop), 600)
    seconds = time.perf_counter() - start
    await finish(engine, group, handled, count)
    return seconds


RUNS: dict[str, tuple[str, Run]] = {
    # profile name: (result key, run)
    "ordered": (
        "ordered_consume_batch_commit_msgs_per_s",
        lambda e, g, n: ordered_consume(e, g, n, batch_ack=True),
    ),
    "ordered-per-delivery": (
        "ordered_consume_per_delivery_ack_msgs_per_s",
        lambda e, g, n: ordered_consume(e, g, n, batch_ack=False),
    ),
    "shared": ("shared_consume_ack_msgs_per_s", lambda e, g, n: shared_consume(e, g, n, batch_ack=False)),
    "shared-batch": (
        "shared_consume_ack_batch_msgs_per_s",
        lambda e, g, n: shared_consume(e, g, n, batch_ack=True),
    ),
    "push": ("push_shared_msgs_per_s", push_shared),
}


# -- end-to-end latency --------------------------------------------------------------------------


@dataclass
class LatencyRun:
    latencies_ms: list[float]  # sorted, warm-up excluded
    sent: int
    publish_rate: float  # achieved


async def e2e_latency(engine: Engine, group: str, rate: int, seconds: float) -> LatencyRun:
    total = max(1, int(rate * seconds))
    filler = bytes(PAYLOAD_BYTES - E2E_SEND_TIME.size)
    config = SharedGroupConfig(group, max_ack_pending=MAX_ACK_PENDING)
    member = (await engine.shared_group(STREAM, config)).member("m")
    received: list[int] = []  # latency in ns, in arrival order

    async def publisher() -> float:
        publish = engine.publish
        pack = E2E_SEND_TIME.pack
        clock = time.perf_counter_ns
        sent = 0
        start = clock()
        while sent < total:
            due = min(total, (clock() - start) * rate // 1_000_000_000 + 1)
            while sent < due:
                await publish(SUBJECT, pack(clock()) + filler)
                sent += 1
            await asyncio.sleep(0.0005)
        return total / ((clock() - start) / 1e9)

    async def consumer() -> None:
        fetch = member.fetch
        unpack = E2E_SEND_TIME.unpack_from
        clock = time.perf_counter_ns
        while len(received) < total:
            deliveries = await fetch(SHARED_FETCH, FETCH_TIMEOUT_S)
            now = clock()
            if not deliveries:
                raise SystemExit(f"e2e: nothing for {FETCH_TIMEOUT_S} s, {len(received)} of {total} received")
            for d in deliveries:
                received.append(now - unpack(d.message.payload)[0])
                await d.ack()

    consuming = asyncio.ensure_future(consumer())
    publish_rate = await publisher()
    await asyncio.wait_for(consuming, seconds + 30)
    await finish(engine, group, len(received), total)
    kept = sorted(ns / 1e6 for ns in received[int(total * E2E_WARMUP) :])
    return LatencyRun(kept, total, publish_rate)


# -- the run -------------------------------------------------------------------------------------


class Folders:
    """Fresh data folders under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def new(self, tag: str) -> Path:
        self.count += 1
        return self.root / f"{self.count:03d}-{tag}"


async def measure_groups(
    sizes: Sizes, folders: Folders, results: Results, log: Callable[[str], None]
) -> None:
    reps = range(sizes.repetitions)
    plan = [
        ("ordered", sizes.ordered),
        ("ordered-per-delivery", sizes.ordered),
        ("shared", sizes.shared),
        ("shared-batch", sizes.shared),
        ("push", sizes.push),
    ]
    for kind, count in plan:
        # A stream of exactly ``count`` messages: every run consumes it all, to lag 0.
        path = folders.new(kind)
        engine = await open_stream(path)
        try:
            await fill(engine, count)
            key, run = RUNS[kind]
            runs = [count / await run(engine, f"{kind}-{rep}", count) for rep in reps]
            log(f"{kind}: {results.add(key, runs):,.0f} msgs/s")
        finally:
            await engine.close()
            shutil.rmtree(path, ignore_errors=True)

    p50s, p99s, p999s, maxes, rates = [], [], [], [], []
    for rep in reps:
        path = folders.new("e2e")
        engine = await open_stream(path)
        try:
            run = await e2e_latency(engine, f"latency-{rep}", E2E_RATE, sizes.e2e_seconds)
        finally:
            await engine.close()
            shutil.rmtree(path, ignore_errors=True)
        lat = run.latencies_ms
        p50s.append(percentile(lat, 0.50))
        p99s.append(percentile(lat, 0.99))
        p999s.append(percentile(lat, 0.999))
        maxes.append(lat[-1])
        rates.append(run.publish_rate)
    log(
        f"e2e at {E2E_RATE:,} msgs/s: p50 {results.add('e2e_latency_p50_ms', p50s, 3):.3f} ms, "
        f"p99 {results.add('e2e_latency_p99_ms', p99s, 3):.3f} ms"
    )
    results.add("e2e_latency_p999_ms", p999s, 3)
    results.add("e2e_latency_max_ms", maxes, 3)
    results.add("e2e_publish_rate_msgs_per_s", rates)


def measure(args: argparse.Namespace, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = Sizes.choose(args.quick, args.messages)
    results = Results()
    check_floor_records(SUBJECT, PAYLOAD)
    floor_file = root / "floor.log"
    floor_runs = [
        sizes.floor / floor_file_append(floor_file, sizes.floor, SUBJECT, PAYLOAD)
        for _ in range(sizes.repetitions)
    ]
    log(f"floor (build + write): {results.add('floor_file_append_msgs_per_s', floor_runs):,.0f} msgs/s")
    asyncio.run(measure_groups(sizes, Folders(root), results, log))

    v = results.values
    floor = v["floor_file_append_msgs_per_s"]
    v["ordered_vs_floor_ratio"] = round(v["ordered_consume_batch_commit_msgs_per_s"] / floor, 3)
    v["shared_vs_floor_ratio"] = round(v["shared_consume_ack_msgs_per_s"] / floor, 3)
    targets = {
        name: {"target": text, "value": v[name], "pass": v[name] >= threshold}
        for name, (text, threshold) in TARGETS.items()
    }
    e2e_messages = int(E2E_RATE * sizes.e2e_seconds)
    return {
        "benchmark": "consumers",
        "quick": args.quick,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "payload_bytes": PAYLOAD_BYTES,
        "subject": SUBJECT,
        "partitions": 1,
        "durability": DURABILITY,
        "repetitions": sizes.repetitions,
        "fetch_sizes": {"ordered": ORDERED_FETCH, "shared": SHARED_FETCH},
        "max_ack_pending": MAX_ACK_PENDING,
        "push_max_outstanding": PUSH_OUTSTANDING,
        "e2e_offered_rate_msgs_per_s": E2E_RATE,
        "e2e_seconds": sizes.e2e_seconds,
        "messages": {
            "floor": sizes.floor,
            "ordered_consume_batch_commit": sizes.ordered,
            "ordered_consume_per_delivery_ack": sizes.ordered,
            "shared_consume_ack": sizes.shared,
            "shared_consume_ack_batch": sizes.shared,
            "push_shared": sizes.push,
            "e2e_latency": e2e_messages,
            "e2e_latency_counted": e2e_messages - int(e2e_messages * E2E_WARMUP),
        },
        **v,
        "spread": results.spread,
        "targets": targets,
        "targets_passed": sum(t["pass"] for t in targets.values()),
        "targets_total": len(targets),
    }


def profile(kind: str, args: argparse.Namespace, root: Path) -> None:
    """Run one consume measurement under cProfile; print the top functions on stderr."""
    sizes = Sizes.choose(args.quick, args.messages)
    count = sizes.ordered if kind.startswith("ordered") else sizes.push if kind == "push" else sizes.shared
    key, run = RUNS[kind]

    async def main() -> float:
        path = root / "profile"
        engine = await open_stream(path)
        try:
            await fill(engine, count)
            profiler.enable()
            try:
                return await run(engine, kind, count)
            finally:
                profiler.disable()
        finally:
            await engine.close()

    profiler = cProfile.Profile()
    seconds = asyncio.run(main())
    print(f"{key} under cProfile: {count / seconds:,.0f} msgs/s ({count:,} messages)", file=sys.stderr)
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(args.profile_lines)


def print_table(report: dict[str, Any]) -> None:
    print(
        f"pigeon consumer groups, Python {report['python']}, {report['cpu_count']} CPUs, "
        f"{report['payload_bytes']}-byte payloads, median of {report['repetitions']}"
    )
    counts = report["messages"]
    rows = [
        ("floor: build records + write", "floor_file_append_msgs_per_s"),
        ("ordered, fetch 1000, ack_batch", "ordered_consume_batch_commit_msgs_per_s"),
        ("ordered, fetch 1000, d.ack()", "ordered_consume_per_delivery_ack_msgs_per_s"),
        ("shared, fetch 500, d.ack()", "shared_consume_ack_msgs_per_s"),
        ("shared, fetch 500, ack_batch", "shared_consume_ack_batch_msgs_per_s"),
        ("push (shared), no-op handler", "push_shared_msgs_per_s"),
    ]
    for label, key in rows:
        count_key = "floor" if key.startswith("floor") else key.removesuffix("_msgs_per_s")
        spread = report["spread"][key]
        print(
            f"  {label:32} {report[key]:>14,.0f} msgs/s   "
            f"[{spread['min']:,.0f} .. {spread['max']:,.0f}]  ({counts[count_key]:,} messages)"
        )
    print(
        f"  e2e latency at {report['e2e_offered_rate_msgs_per_s']:,} msgs/s: "
        f"p50 {report['e2e_latency_p50_ms']:.3f} ms, p99 {report['e2e_latency_p99_ms']:.3f} ms, "
        f"p99.9 {report['e2e_latency_p999_ms']:.3f} ms, max {report['e2e_latency_max_ms']:.3f} ms "
        f"({counts['e2e_latency_counted']:,} messages counted)"
    )
    print("targets:")
    for name, target in report["targets"].items():
        mark = "pass" if target["pass"] else "FAIL"
        print(f"  {mark}  {name} {target['target']}  (got {target['value']:,})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a short run (tens of seconds)")
    parser.add_argument("--dir", type=Path, help="where to put the temporary data folders")
    parser.add_argument("--profile", choices=sorted(RUNS), help="profile one consume path (cProfile)")
    parser.add_argument("--profile-lines", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pigeon-bench-consumers-", dir=args.dir))
    try:
        if args.profile:
            profile(args.profile, args, root)
            return 0
        report = measure(args, root, log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
