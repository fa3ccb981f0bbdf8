"""Publish and consume+ack throughput of every transport, same workload, one run.

``python benchmarks/transports.py --json`` prints one JSON object keyed by transport name,
each with ``publish_msgs_per_s`` (one awaited publish at a time) and
``consume_ack_msgs_per_s`` (a shared group, fetching batches, acking each message), plus the
ratio of each figure to the embedded engine's. ``--quick`` runs a short version. Transports
whose service is unreachable are reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from typing import Any

from pigeon.testing.services import SERVICES, URLS, reachable, unique_name
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec

PAYLOAD = b"x" * 100


async def measure(url: str, count: int) -> dict[str, float]:
    transport = await connect(url)
    stream = unique_name("bench")
    prefix = stream.replace("-", "_")
    try:
        await transport.create_stream(StreamSpec(stream, (f"{prefix}.>",)))
        start = time.perf_counter()
        for _ in range(count):
            await transport.publish(f"{prefix}.data", PAYLOAD)
        publish_s = time.perf_counter() - start
        consumer = await transport.consumer(stream, ConsumerSpec("bench", max_ack_pending=10_000))
        received = 0
        start = time.perf_counter()
        while received < count:
            batch = await consumer.fetch(min(500, count - received), 5.0)
            if not batch:
                raise RuntimeError(f"{url}: consumer stalled at {received} of {count}")
            for message in batch:
                await message.ack()
            received += len(batch)
        consume_s = time.perf_counter() - start
        await consumer.close()
        return {"publish_msgs_per_s": count / publish_s, "consume_ack_msgs_per_s": count / consume_s}
    finally:
        await transport.delete_stream(stream)
        await transport.close()


async def run(quick: bool, only: list[str] | None) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="pigeon-bench-")
    targets = {
        "embedded": (f"file://{folder}", 20_000 if quick else 200_000),
        "memory": ("memory://", 20_000 if quick else 200_000),
    }
    for name in ("nats", "redis", "rabbitmq", "postgres"):
        targets[name] = (URLS[name], 2_000 if quick else 20_000)
    results: dict[str, Any] = {}
    for name, (url, count) in targets.items():
        if only and name not in only:
            continue
        host, port = SERVICES.get(name, ("", 0))
        if host and not reachable(host, port):
            results[name] = {"skipped": f"{host}:{port} unreachable"}
            continue
        print(f"{name}: {count} messages ...", file=sys.stderr)
        try:
            results[name] = {"messages": count, **await measure(url, count)}
        except Exception as exc:  # a broken transport is reported, the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    base = results.get("embedded", {})
    for figures in results.values():
        for key in ("publish_msgs_per_s", "consume_ack_msgs_per_s"):
            if key in figures and key in base:
                figures[key.replace("_msgs_per_s", "_ratio_to_embedded")] = round(figures[key] / base[key], 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--only", nargs="*", help="transport names to run")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick, args.only))
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'transport':<10} {'publish/s':>12} {'ratio':>7} {'consume+ack/s':>14} {'ratio':>7}")
    for name, f in results.items():
        if "publish_msgs_per_s" not in f:
            print(f"{name:<10} {f.get('skipped') or f.get('error')}")
            continue
        print(
            f"{name:<10} {f['publish_msgs_per_s']:>12,.0f} {f.get('publish_ratio_to_embedded', 0):>7.3f} "
            f"{f['consume_ack_msgs_per_s']:>14,.0f} {f.get('consume_ack_ratio_to_embedded', 0):>7.3f}"
        )


if __name__ == "__main__":
    main()
