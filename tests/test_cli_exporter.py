"""`pigeon exporter` as a process, against the machine's real brokers: scraped and parsed."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec

LISTENING = re.compile(r"listening: (http://\S+)/metrics")


def exporter(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"exporter-{time.monotonic_ns()}.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pigeon.cli", "exporter", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return process, log


def read(log: Path) -> str:
    return log.read_text()


async def scrape_when_ready(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = LISTENING.search(read(log))
        if found:
            async with httpx.AsyncClient() as http:
                for _ in range(50):
                    text = (await http.get(f"{found[1]}/metrics")).text
                    if "kafka_consumergroup_lag{" in text:
                        return text
                    await asyncio.sleep(0.1)
        assert process.poll() is None, read(log)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the exporter did not serve lag: {read(log)}")


@pytest.mark.parametrize("service", ["nats", "redis"])
async def test_exports_the_lag_of_a_real_broker(service: str, tmp_path: Path) -> None:
    url = require_service(service)
    transport = await connect(url)
    stream, group = unique_name("ex"), unique_name("g")
    prefix = stream.replace("-", "_")
    await transport.create_stream(StreamSpec(stream, (f"{prefix}.>",)))
    process = None
    try:
        for i in range(12):
            await transport.publish(f"{prefix}.x", b"%d" % i)
        consumer = await transport.consumer(stream, ConsumerSpec(group))
        done = 0
        while done < 5:
            for received in await consumer.fetch(5 - done, 2):
                await received.ack()
                done += 1
        await consumer.close()
        expected = sum(p.lag for p in await transport.lag(stream, group))
        assert expected == 7
        process, log = exporter(tmp_path, "--url", url, "--group", f"{stream}:{group}", "--interval", "0.1")
        text = await scrape_when_ready(process, log)
        values = {
            (s.name, s.labels.get("partition")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.labels.get("topic") == stream
        }
        assert values[("kafka_consumergroup_lag", "0")] == 7
        assert values[("kafka_consumergroup_lag_sum", None)] == 7
        assert values[("kafka_topic_partition_current_offset", "0")] == 12
        assert ("pigeon_group_health_status", None) in values
    finally:
        if process is not None:
            process.terminate()
            assert process.wait(10) == 0
        await transport.delete_stream(stream)
        await transport.close()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--url", "redis://127.0.0.1:1", "--group", "s:g"], "cannot reach redis"),
        (["--url", "bogus://x", "--group", "s:g"], "no transport for 'bogus'"),
        (["--url", "memory://", "--group", "s"], "write STREAM:GROUP"),
        (["--url", "memory://", "--group", "missing:g"], "no stream named 'missing'"),
    ],
    ids=["unreachable", "bad-url", "bad-group", "unknown-stream"],
)
def test_user_errors_are_one_line(args: list[str], said: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pigeon.cli", "exporter", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], done.stderr
