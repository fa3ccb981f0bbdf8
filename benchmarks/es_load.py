"""Loading an event-sourced aggregate: flat with snapshots, linear in history without.

For each history length (1k, 10k and 100k events by default) one aggregate is written in
commits of ``--per-commit`` events, with a snapshot every ``--snapshot-every`` events in a
folder store; then the aggregate is loaded ``--runs`` times with the snapshots and without
them, and the median load time is reported with its ratio to the shortest history's. The
default interval, 900, leaves the same 100 events after the last snapshot at every default
length, so the loads with snapshots replay alike and only the history differs.

    python benchmarks/es_load.py [--lengths 1000,10000,100000] [--snapshot-every 900]
                                 [--per-commit 10] [--runs 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pigeon.engine import Engine
from pigeon.es import Aggregate, EventStore, FolderSnapshotStore, Repository, domain_event, handles


@domain_event("BenchTicked")
@dataclass(frozen=True)
class Ticked:
    amount: int


class Meter(Aggregate):
    total = 0
    ticks = 0

    @handles(Ticked)
    def _ticked(self, event: Ticked) -> None:
        self.total += event.amount
        self.ticks += 1


async def _write(repo: Repository[Meter], id: str, length: int, per_commit: int) -> None:
    meter = Meter(id)
    for i in range(length):
        meter.trigger(Ticked(i % 7))
        if meter.version % per_commit == 0:
            await repo.save(meter)
    await repo.save(meter)


async def _time_loads(repo: Repository[Meter], id: str, runs: int, length: int) -> dict[str, Any]:
    seconds = []
    replayed = 0
    for _ in range(runs):
        start = time.perf_counter()
        meter = await repo.load(id)
        seconds.append(time.perf_counter() - start)
        if meter.ticks != length:
            raise SystemExit(f"loaded {meter.ticks} ticks, wrote {length}")
        replayed = meter.load_info.replayed
    return {
        "load_ms": round(statistics.median(seconds) * 1000, 3),
        "replayed": replayed,
        "runs_ms": [round(s * 1000, 3) for s in seconds],
    }


async def run(lengths: list[int], every: int, per_commit: int, runs: int, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"with_snapshots": {}, "without_snapshots": {}}
    async with await Engine.open(folder / "data") as engine:
        store = await EventStore.open(engine, "bench", durability="never")
        snapshots = FolderSnapshotStore(folder / "snapshots")
        with_snapshots = Repository(store, Meter, snapshots=snapshots, snapshot_every=every)
        without = Repository(store, Meter)
        for length in lengths:
            id = f"m{length}"
            await _write(with_snapshots, id, length, per_commit)
            out["with_snapshots"][str(length)] = await _time_loads(with_snapshots, id, runs, length)
            out["without_snapshots"][str(length)] = await _time_loads(without, id, runs, length)
    for kind in ("with_snapshots", "without_snapshots"):
        base = out[kind][str(lengths[0])]["load_ms"]
        for figures in out[kind].values():
            figures["ratio_to_first"] = round(figures["load_ms"] / base, 2) if base else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1000,10000,100000", help="history lengths, comma-separated")
    parser.add_argument("--snapshot-every", type=int, default=900)
    parser.add_argument("--per-commit", type=int, default=10, help="events per append")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        lengths = sorted(int(n) for n in args.lengths.split(","))
    except ValueError:
        parser.error(f"--lengths takes integers separated by commas, not {args.lengths!r}")
    if lengths[0] < 1 or args.snapshot_every < 1 or args.per_commit < 1 or args.runs < 1:
        parser.error("lengths, --snapshot-every, --per-commit and --runs must be positive")
    with tempfile.TemporaryDirectory(prefix="pigeon-es-bench-") as folder:
        results = asyncio.run(run(lengths, args.snapshot_every, args.per_commit, args.runs, Path(folder)))
    results.update(
        lengths=lengths,
        snapshot_every=args.snapshot_every,
        events_per_commit=args.per_commit,
        runs=args.runs,
        python=platform.python_version(),
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
