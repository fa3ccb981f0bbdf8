"""Bad input campaign: one `pigeon serve` with a stream, messages and groups in it, fuzzed
through its NATS port (`fuzz_nats`), its admin API and its schema registry (`fuzz_http`);
then damaged data files on the engine directly (`fuzz_files`). Whatever the server logged
as an unhandled error (a traceback) is a failure too: a client mistake must never be one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pigeon.transport import ConsumerSpec, StreamSpec, connect
from serve_process import Served

from . import fuzz_files, fuzz_http, fuzz_nats
from .common import Report, payload_for
from .crash_worker import OPTIONS

KNOWN = {"stream": "orders", "group": "billing", "partition": "0", "offset": "1"}


async def _populate(url: str) -> None:
    async with await connect(url, OPTIONS) as transport:
        await transport.create_stream(StreamSpec("orders", ("orders.>",), partitions=2))
        for i in range(20):
            await transport.publish("orders.new", payload_for(f"o-{i}"), msg_id=f"o-{i}")
        for kind in ("shared", "ordered"):
            consumer = await transport.consumer("orders", ConsumerSpec(f"{kind}-g", kind=kind))
            await consumer.close()
        await transport.consumer("orders", ConsumerSpec("billing", max_deliver=1))


def run(work: Path, examples: int, seed: int) -> Report:
    report = Report("fuzz")
    work.mkdir(parents=True, exist_ok=True)
    server = Served(work / "data").wait_listening(30)
    try:
        asyncio.run(_populate(server.nats_url))
        fuzz_nats.run(server.port, examples, seed, report)
        fuzz_http.registry_api(server.http_url, examples, report)
        fuzz_http.admin_api(server.http_url, max(5, examples // 10), report, KNOWN)
        if server.process.poll() is not None:
            report.fail(f"pigeon serve exited {server.process.returncode} during the fuzzing")
        elif not fuzz_nats.alive(server.port):
            report.fail("pigeon serve stopped answering during the fuzzing")
    finally:
        server.stop()
    tracebacks = server.stderr().count("Traceback")
    report.figures["server_tracebacks"] = tracebacks
    if tracebacks:
        report.fail(f"pigeon serve logged {tracebacks} tracebacks: {server.log}")
    fuzz_files.run(work / "files", examples, seed, report)
    return report
