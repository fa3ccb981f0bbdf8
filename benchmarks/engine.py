"""Storage engine: publish, group commit, read and reopen, against the Python floor.

Every throughput figure sends 100-byte payloads on one subject to a one-partition stream in
a fresh data folder, and is the median of 3 repetitions (1 with ``--quick``). The floor is
measured in the same run: the least Python can do to put the same records in a file (build
each record as ``records.encode_plain_records`` does, join 100 of them, one unbuffered write
per 100), so the engine's figures can be read as a fraction of what the interpreter allows
on this machine.

With durability "interval" a publish returns once its batch is written; the fsyncs run on
the event loop's timer, so a publisher that never yields defers them all to ``close``.
``publish_batched_until_durable`` times the same bulk load including that final close.

Reopening and the memory of a full read are measured on a big stream (10 million messages,
1 million with ``--quick``) in fresh subprocesses, so nothing the builder cached is counted.

Targets are reported, never asserted: the exit status is 0 whether they pass or not.

    python benchmarks/engine.py [--json] [--quick] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pigeon.engine import Engine, StreamConfig, records
from pigeon.message import Message

PAYLOAD_BYTES = 100
PAYLOAD = bytes(range(PAYLOAD_BYTES))
SUBJECT = "bench.data"
STREAM = "bench"
BATCH = 1000  # payloads per publish_many / publish_batch call
FLOOR_CHUNK = 100  # records per write() in the floor
PUBLISHERS = 100  # concurrent tasks in the group-commit measurement

TARGETS = {
    "publish_batched_msgs_per_s": ">= 1,000,000",
    "batched_vs_floor_ratio": ">= 0.7",
    "publish_awaited_msgs_per_s": ">= 200,000",
    "group_commit_speedup": ">= 20",
    "read_msgs_per_s": ">= 1,500,000",
    "read_10m_peak_rss_mb": "< 150",
    "reopen_10m_s": "< 1.0",
}


@dataclass(frozen=True)
class Sizes:
    repetitions: int
    floor: int
    batched: int
    batch_messages: int
    awaited: int
    always_concurrent: int
    always_serial: int
    read: int
    reopen: int

    @classmethod
    def choose(cls, quick: bool, messages: int | None, reopen: int | None) -> Sizes:
        if quick:
            sizes = cls(1, 4_000_000, 4_000_000, 1_000_000, 1_000_000, 20_000, 300, 4_000_000, 1_000_000)
        else:
            sizes = cls(3, 5_000_000, 5_000_000, 1_000_000, 1_000_000, 20_000, 300, 5_000_000, 10_000_000)
        if messages is not None:  # a tiny run (the smoke test): cap every count
            cap = max(messages, 1)
            sizes = replace(
                sizes,
                floor=_round_up(min(sizes.floor, cap), FLOOR_CHUNK),
                batched=_round_up(min(sizes.batched, cap), BATCH),
                batch_messages=_round_up(min(sizes.batch_messages, cap), BATCH),
                awaited=min(sizes.awaited, cap),
                always_concurrent=_round_up(min(sizes.always_concurrent, cap), PUBLISHERS),
                always_serial=min(sizes.always_serial, cap),
                read=_round_up(min(sizes.read, cap), BATCH),
            )
        if reopen is not None:
            sizes = replace(sizes, reopen=_round_up(max(reopen, 1), BATCH))
        return sizes


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# -- the floor -----------------------------------------------------------------------------


_RECORD = struct.Struct("<IBH")  # length, flags, subject length: records.encode_plain_records


def floor_file_append(path: Path, count: int) -> float:
    """Build every record in the loop (as the encoder does) and write 100 per write()."""
    subject_bytes = SUBJECT.encode()
    subject_len = len(subject_bytes)
    overhead = 3 + subject_len
    pack = _RECORD.pack
    payload = PAYLOAD
    with open(path, "wb", buffering=0) as f:
        write = f.write
        start = time.perf_counter()
        for _ in range(count // FLOOR_CHUNK):
            payloads = [payload] * FLOOR_CHUNK
            write(b"".join([pack(overhead + len(p), 0, subject_len) + subject_bytes + p for p in payloads]))
        seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def floor_raw_write(path: Path, count: int) -> float:
    """The same writes with the records built beforehand: the file system alone."""
    chunk = b"".join(records.encode_plain_records(SUBJECT, [PAYLOAD] * FLOOR_CHUNK))
    with open(path, "wb", buffering=0) as f:
        write = f.write
        start = time.perf_counter()
        for _ in range(count // FLOOR_CHUNK):
            write(chunk)
        seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def check_floor_records() -> None:
    """The floor must write exactly the bytes pigeon's encoder writes."""
    subject_bytes = SUBJECT.encode()
    header = _RECORD.pack(3 + len(subject_bytes) + len(PAYLOAD), 0, len(subject_bytes))
    mine = header + subject_bytes + PAYLOAD
    if [mine] != records.encode_plain_records(SUBJECT, [PAYLOAD]):
        raise SystemExit("the floor's records differ from records.encode_plain_records")


# -- engine measurements -------------------------------------------------------------------


class Folders:
    """Fresh data folders under one root, each removed after use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def new(self, tag: str) -> Path:
        self.count += 1
        return self.root / f"{self.count:03d}-{tag}"


async def open_stream(path: Path, durability: str) -> Engine:
    engine = await Engine.open(path)
    await engine.create_stream(StreamConfig(STREAM, ("bench.>",), partitions=1, durability=durability))  # type: ignore[arg-type]
    return engine


async def on_fresh_stream(
    folders: Folders, tag: str, durability: str, run: Callable[[Engine], Awaitable[float]]
) -> float:
    path = folders.new(tag)
    engine = await open_stream(path, durability)
    try:
        return await run(engine)
    finally:
        await engine.close()
        shutil.rmtree(path, ignore_errors=True)


def publish_batched(count: int, until_durable: bool = False) -> Callable[[Engine], Awaitable[float]]:
    """publish_many, 1000 payloads a call; ``until_durable`` also times the closing fsyncs."""

    async def run(engine: Engine) -> float:
        publish_many = engine.publish_many
        payload = PAYLOAD
        start = time.perf_counter()
        for _ in range(count // BATCH):
            await publish_many(SUBJECT, [payload] * BATCH)
        if until_durable:
            await engine.close()  # everything written is fsynced before close returns
        return time.perf_counter() - start

    return run


def publish_batch_messages(count: int) -> Callable[[Engine], Awaitable[float]]:
    async def run(engine: Engine) -> float:
        publish_batch = engine.publish_batch
        payload = PAYLOAD
        start = time.perf_counter()
        for _ in range(count // BATCH):
            await publish_batch([Message(SUBJECT, payload) for _ in range(BATCH)])
        return time.perf_counter() - start

    return run


def publish_awaited(count: int) -> Callable[[Engine], Awaitable[float]]:
    async def run(engine: Engine) -> float:
        publish = engine.publish
        payload = PAYLOAD
        start = time.perf_counter()
        for _ in range(count):
            await publish(SUBJECT, payload)
        return time.perf_counter() - start

    return run


def publish_concurrent(count: int, publishers: int) -> Callable[[Engine], Awaitable[float]]:
    async def run(engine: Engine) -> float:
        publish = engine.publish
        payload = PAYLOAD

        async def publisher(n: int) -> None:
            for _ in range(n):
                await publish(SUBJECT, payload)

        share = count // publishers
        start = time.perf_counter()
        await asyncio.gather(*(publisher(share) for _ in range(publishers)))
        return time.perf_counter() - start

    return run


async def build_stream(path: Path, count: int) -> float:
    """A stream of ``count`` messages written with publish_many and closed cleanly."""
    engine = await open_stream(path, "interval")
    try:
        start = time.perf_counter()
        for _ in range(count // BATCH):
            await engine.publish_many(SUBJECT, [PAYLOAD] * BATCH)
        seconds = time.perf_counter() - start
    finally:
        await engine.close()
    return seconds


async def read_all(engine: Engine) -> tuple[int, int]:
    messages = size = 0
    async for message in engine.read(STREAM, 0):
        size += len(message.payload)
        messages += 1
    return messages, size


def fetch_all(engine: Engine) -> tuple[int, int]:
    messages = size = offset = 0
    fetch = engine.fetch
    while True:
        batch = fetch(STREAM, 0, offset, BATCH)
        if not batch:
            return messages, size
        for message in batch:
            size += len(message.payload)
        messages += len(batch)
        offset = batch[-1].offset + 1  # type: ignore[operator]


# -- the children: reopening and reading in a fresh process -------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


async def child(kind: str, path: Path) -> dict[str, Any]:
    start = time.perf_counter()
    engine = await Engine.open(path)
    open_s = time.perf_counter() - start
    out: dict[str, Any] = {"open_s": open_s}
    try:
        if kind == "read":
            start = time.perf_counter()
            out["messages"], out["bytes"] = await read_all(engine)
            out["read_s"] = time.perf_counter() - start
        out["peak_rss_mb"] = peak_rss_mb()
    finally:
        await engine.close()
    return out


def run_child(kind: str, path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind, "--dir", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the {kind} child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the run -------------------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.spread: dict[str, dict[str, Any]] = {}

    def add(self, name: str, runs: Sequence[float], digits: int = 1) -> float:
        value = statistics.median(runs)
        self.values[name] = round(value, digits)
        self.spread[name] = {
            "min": round(min(runs), digits),
            "max": round(max(runs), digits),
            "runs": [round(r, digits) for r in runs],
        }
        return value


async def measure_engine(
    sizes: Sizes, folders: Folders, results: Results, log: Callable[[str], None]
) -> None:
    reps = range(sizes.repetitions)

    async def rates(tag: str, durability: str, count: int, run: Callable[[Engine], Awaitable[float]]) -> None:
        runs = [count / await on_fresh_stream(folders, tag, durability, run) for _ in reps]
        value = results.add(f"{tag}_msgs_per_s", runs)
        log(f"{tag}: {value:,.0f} msgs/s")

    # The floor and the bulk publish alternate, so drift in the machine's speed (page cache
    # writeback, a noisy neighbour) hits both sides of their ratio alike.
    check_floor_records()
    floor_file = folders.root / "floor.log"
    floor_runs, raw_runs, batched_runs = [], [], []
    for _ in reps:
        floor_runs.append(sizes.floor / floor_file_append(floor_file, sizes.floor))
        raw_runs.append(sizes.floor / floor_raw_write(floor_file, sizes.floor))
        seconds = await on_fresh_stream(folders, "batched", "interval", publish_batched(sizes.batched))
        batched_runs.append(sizes.batched / seconds)
    log(f"floor (build + write): {results.add('floor_file_append_msgs_per_s', floor_runs):,.0f} msgs/s")
    log(f"floor (write only): {results.add('floor_raw_write_msgs_per_s', raw_runs):,.0f} msgs/s")
    log(f"publish_batched: {results.add('publish_batched_msgs_per_s', batched_runs):,.0f} msgs/s")

    await rates(
        "publish_batched_until_durable", "interval", sizes.batched, publish_batched(sizes.batched, True)
    )
    count = sizes.batch_messages
    await rates("publish_batch_messages", "interval", count, publish_batch_messages(count))
    await rates("publish_awaited", "interval", sizes.awaited, publish_awaited(sizes.awaited))
    await rates(
        "publish_always_concurrent",
        "always",
        sizes.always_concurrent,
        publish_concurrent(sizes.always_concurrent, PUBLISHERS),
    )
    await rates("publish_always_serial", "always", sizes.always_serial, publish_awaited(sizes.always_serial))

    # Reading: one stream, closed and reopened so reads start from a freshly opened engine.
    path = folders.new("read")
    await build_stream(path, sizes.read)
    engine = await Engine.open(path)
    try:
        read_runs, fetch_runs = [], []
        for _ in reps:
            start = time.perf_counter()
            messages, size = await read_all(engine)
            read_runs.append(messages / (time.perf_counter() - start))
            if (messages, size) != (sizes.read, sizes.read * PAYLOAD_BYTES):
                raise SystemExit(f"read {messages} messages of {size} bytes, expected {sizes.read}")
            start = time.perf_counter()
            messages, size = fetch_all(engine)
            fetch_runs.append(messages / (time.perf_counter() - start))
            if messages != sizes.read:
                raise SystemExit(f"fetched {messages} messages, expected {sizes.read}")
    finally:
        await engine.close()
        shutil.rmtree(path, ignore_errors=True)
    log(f"read: {results.add('read_msgs_per_s', read_runs):,.0f} msgs/s")
    log(f"fetch: {results.add('fetch_msgs_per_s', fetch_runs):,.0f} msgs/s")


def measure(args: argparse.Namespace, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = Sizes.choose(args.quick, args.messages, args.reopen_messages)
    results = Results()
    reps = range(sizes.repetitions)

    folders = Folders(root)
    asyncio.run(measure_engine(sizes, folders, results, log))

    # The big stream: built once, then reopened and read in fresh processes.
    big = folders.new("big")
    build_s = asyncio.run(build_stream(big, sizes.reopen))
    log(f"built {sizes.reopen:,} messages in {build_s:.1f} s")
    opens = [run_child("open", big) for _ in reps]
    reopen_s = results.add("reopen_10m_s", [o["open_s"] for o in opens], 6)
    log(f"reopen: {reopen_s:.4f} s")
    baseline = results.add("open_baseline_rss_mb", [o["peak_rss_mb"] for o in opens], 2)
    reads = [run_child("read", big) for _ in reps]
    for r in reads:
        if r["messages"] != sizes.reopen:
            raise SystemExit(f"the read child saw {r['messages']} messages, expected {sizes.reopen}")
    peak = results.add("read_10m_peak_rss_mb", [r["peak_rss_mb"] for r in reads], 2)
    results.add("read_10m_msgs_per_s", [r["messages"] / r["read_s"] for r in reads])
    log(f"read child peak RSS: {peak:.1f} MB (open only: {baseline:.1f} MB)")
    big_bytes = sum(f.stat().st_size for f in big.rglob("*") if f.is_file())
    shutil.rmtree(big, ignore_errors=True)

    v = results.values
    v["batched_vs_floor_ratio"] = round(
        v["publish_batched_msgs_per_s"] / v["floor_file_append_msgs_per_s"], 3
    )
    v["group_commit_speedup"] = round(
        v["publish_always_concurrent_msgs_per_s"] / v["publish_always_serial_msgs_per_s"], 1
    )
    v["read_10m_added_rss_mb"] = round(v["read_10m_peak_rss_mb"] - v["open_baseline_rss_mb"], 2)

    checks = {
        "publish_batched_msgs_per_s": v["publish_batched_msgs_per_s"] >= 1_000_000,
        "batched_vs_floor_ratio": v["batched_vs_floor_ratio"] >= 0.7,
        "publish_awaited_msgs_per_s": v["publish_awaited_msgs_per_s"] >= 200_000,
        "group_commit_speedup": v["group_commit_speedup"] >= 20,
        "read_msgs_per_s": v["read_msgs_per_s"] >= 1_500_000,
        "read_10m_peak_rss_mb": v["read_10m_peak_rss_mb"] < 150,
        "reopen_10m_s": v["reopen_10m_s"] < 1.0,
    }
    targets = {name: {"target": TARGETS[name], "value": v[name], "pass": ok} for name, ok in checks.items()}
    return {
        "benchmark": "engine",
        "quick": args.quick,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "payload_bytes": PAYLOAD_BYTES,
        "subject": SUBJECT,
        "repetitions": sizes.repetitions,
        "messages": {
            "floor": sizes.floor,
            "publish_batched": sizes.batched,
            "publish_batch_messages": sizes.batch_messages,
            "publish_awaited": sizes.awaited,
            "publish_always_concurrent": sizes.always_concurrent,
            "publish_always_concurrent_publishers": PUBLISHERS,
            "publish_always_serial": sizes.always_serial,
            "read": sizes.read,
            "reopen": sizes.reopen,
        },
        "reopen_messages": sizes.reopen,
        "reopen_stream_bytes": big_bytes,
        "reopen_build_msgs_per_s": round(sizes.reopen / build_s, 1),
        **v,
        "spread": results.spread,
        "targets": targets,
        "targets_passed": sum(checks.values()),
        "targets_total": len(checks),
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"pigeon engine, Python {report['python']}, {report['cpu_count']} CPUs, "
        f"{report['payload_bytes']}-byte payloads, median of {report['repetitions']}"
    )
    counts = report["messages"]
    rows = [
        ("floor: build records + write", "floor_file_append_msgs_per_s", "floor"),
        ("floor: write prebuilt records", "floor_raw_write_msgs_per_s", "floor"),
        ("publish_many x1000 (interval)", "publish_batched_msgs_per_s", "publish_batched"),
        ("publish_many, timing close+fsync", "publish_batched_until_durable_msgs_per_s", "publish_batched"),
        ("publish_batch x1000 Messages", "publish_batch_messages_msgs_per_s", "publish_batch_messages"),
        ("publish awaited (interval)", "publish_awaited_msgs_per_s", "publish_awaited"),
        ("publish always, 100 tasks", "publish_always_concurrent_msgs_per_s", "publish_always_concurrent"),
        ("publish always, serial", "publish_always_serial_msgs_per_s", "publish_always_serial"),
        ("read (async iteration)", "read_msgs_per_s", "read"),
        ("fetch x1000", "fetch_msgs_per_s", "read"),
    ]
    for label, key, count_key in rows:
        count = counts[count_key]
        spread = report["spread"][key]
        print(
            f"  {label:32} {report[key]:>14,.0f} msgs/s   "
            f"[{spread['min']:,.0f} .. {spread['max']:,.0f}]  ({count:,} messages)"
        )
    print(f"  {'batched / floor':32} {report['batched_vs_floor_ratio']:>14.3f}")
    print(f"  {'group commit speedup':32} {report['group_commit_speedup']:>14.1f}x")
    n = report["reopen_messages"]
    print(f"  {f'reopen, {n:,} messages':32} {report['reopen_10m_s']:>14.4f} s")
    print(
        f"  {f'read {n:,}: peak RSS':32} {report['read_10m_peak_rss_mb']:>14.2f} MB "
        f"(open only {report['open_baseline_rss_mb']:.2f} MB, "
        f"reading adds {report['read_10m_added_rss_mb']:.2f} MB)"
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
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reopen-messages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("open", "read"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.dir))))
        return 0

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pigeon-bench-", dir=args.dir))
    try:
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
