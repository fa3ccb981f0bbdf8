"""Disk full campaign: a data folder on a small tmpfs fills up.

First the engine alone, then `pigeon serve` with a JetStream client. Each time a ballast
stream takes part of the space, then publishes go on until one fails. Checked: the failure is
a clear error (the engine: an exception naming the cause; JetStream: an error reply, not a
timeout or a dropped connection), everything acknowledged before is still readable and
intact (also after a restart), and once space returns (the ballast stream deleted, as an
operator would) publishing works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors

from pigeon.engine import Engine, StreamConfig
from serve_process import Served

from .common import Report, payload_for

T = TypeVar("T")
SIZE_MB = 8
HANG_S = 10.0  # a publish or a reply slower than this on loopback is taken as hung
PAYLOAD_PAD = 3000  # bytes added to each payload: a few thousand publishes fill the disk


def root_available() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def small_filesystem(where: Path, size_mb: int = SIZE_MB) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _payload(msg_id: str) -> bytes:
    return payload_for(msg_id) + b"." * PAYLOAD_PAD


def _intact(msg_id: str | None, payload: bytes) -> bool:
    return msg_id is not None and payload == _payload(msg_id)


async def _engine_fills(folder: Path, report: Report) -> None:
    acked: dict[str, tuple[int, int]] = {}
    engine = await Engine.open(folder)
    try:
        await engine.create_stream(StreamConfig("ballast", ("ballast.>",), durability="always"))
        await engine.create_stream(
            StreamConfig("data", ("data.>",), durability="always", segment_bytes=256 * 1024)
        )
        for _ in range(SIZE_MB * 1024 // 16):  # about a quarter of the space
            await engine.publish("ballast.x", b"b" * 4096)
        error = await _publish_until_full(engine, acked)
        report.figures["engine_acknowledged_before_full"] = len(acked)
        report.figures["engine_full_error"] = f"{type(error).__name__}: {error}"
        if isinstance(error, TimeoutError):
            report.fail(f"engine: a publish on a full disk hung (no answer in {HANG_S} s)")
        elif not (isinstance(error, OSError) and error.errno == errno.ENOSPC) and "space" not in str(error):
            report.fail(f"engine: the disk-full error does not say so: {type(error).__name__}: {error}")
        _check_stored(engine, acked, report, "engine, disk full")
        await _step(report, "engine: deleting a stream to free space", engine.delete_stream("ballast"))
        for i in range(20):
            msg_id = f"after-{i}"
            publish = asyncio.wait_for(engine.publish("data.x", _payload(msg_id), msg_id=msg_id), HANG_S)
            ack = await _step(report, "engine: publishing after space returned", publish)
            if ack is None:
                break
            acked[msg_id] = (ack.partition, ack.offset)
    finally:
        await _step(report, "engine: closing after the disk was full", engine.close())
    try:
        async with await Engine.open(folder) as engine:
            _check_stored(engine, acked, report, "engine, reopened")
    except Exception as error:
        report.fail(
            f"engine: the folder does not reopen after the disk was full: {type(error).__name__}: {error}"
        )
    report.figures["engine_messages_checked"] = len(acked)


async def _step(report: Report, what: str, step: Awaitable[T]) -> T | None:
    """Await ``step``; an exception is a failure of the campaign, reported, not raised."""
    try:
        return await step
    except Exception as error:
        report.fail(f"{what}: {type(error).__name__}: {error}")
        return None


async def _publish_until_full(engine: Engine, acked: dict[str, tuple[int, int]]) -> BaseException:
    for i in range(100_000):
        msg_id = f"m-{i}"
        try:
            # Bounded: a publish that never returns is a hang, which the report must name.
            ack = await asyncio.wait_for(engine.publish("data.x", _payload(msg_id), msg_id=msg_id), HANG_S)
        except Exception as error:
            return error
        acked[msg_id] = (ack.partition, ack.offset)
    raise AssertionError("the small filesystem never filled up")


def _check_stored(engine: Engine, acked: dict[str, tuple[int, int]], report: Report, when: str) -> None:
    for msg_id, (p, o) in acked.items():
        try:
            got = engine.fetch("data", p, o, 1)
        except Exception as error:
            report.fail(f"{when}: reading {msg_id} at {(p, o)}: {type(error).__name__}: {error}")
            return
        if not got or got[0].offset != o or not _intact(got[0].id, got[0].payload):
            report.fail(f"{when}: {msg_id} acknowledged at {(p, o)} is not stored intact")
            return


async def _serve_fills(url: str, report: Report) -> dict[str, int]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=HANG_S)
    acked: dict[str, int] = {}
    try:
        await js.add_stream(name="ballast", subjects=["ballast.>"])
        await js.add_stream(name="data", subjects=["data.>"])
        for _ in range(SIZE_MB * 1024 // 16):
            await js.publish("ballast.x", b"b" * 4096)
        for i in range(100_000):
            msg_id = f"m-{i}"
            try:
                ack = await js.publish("data.x", _payload(msg_id), headers={"Nats-Msg-Id": msg_id})
            except nats.js.errors.APIError as error:
                report.figures["serve_full_error"] = f"{type(error).__name__}: {error}"
                break
            except Exception as error:
                report.fail(
                    f"serve: a publish on a full disk got no error reply: {type(error).__name__}: {error}"
                )
                return acked
            acked[msg_id] = ack.seq
        report.figures["serve_acknowledged_before_full"] = len(acked)
        await js.delete_stream("ballast")
        for i in range(20):
            msg_id = f"after-{i}"
            try:
                acked[msg_id] = (
                    await js.publish("data.x", _payload(msg_id), headers={"Nats-Msg-Id": msg_id})
                ).seq
            except Exception as error:
                report.fail(f"serve: publishing fails after space returned: {type(error).__name__}: {error}")
                break
    finally:
        await nc.close()
    return acked


async def _serve_stored(folder: Path, acked: dict[str, int], report: Report) -> None:
    """JetStream sequences are engine offsets plus one (one partition)."""
    async with await Engine.open(folder) as engine:
        _check_stored(engine, {m: (0, seq - 1) for m, seq in acked.items()}, report, "serve, after a restart")


def run(work: Path) -> Report:
    report = Report("disk")
    with small_filesystem(work / "engine-fs") as fs:
        asyncio.run(_engine_fills(fs / "data", report))
    with small_filesystem(work / "serve-fs") as fs:
        server = Served(fs / "data").wait_listening(30)
        try:
            acked = asyncio.run(_serve_fills(server.nats_url, report))
            if server.process.poll() is not None:
                report.fail(f"serve: pigeon serve died on a full disk: {server.stderr()[-1000:]}")
        finally:
            code = server.stop()
        if code != 0:
            report.fail(f"serve: the clean stop after a full disk exited {code}: {server.stderr()[-1000:]}")
        report.figures["serve_messages_checked"] = len(acked)
        try:
            asyncio.run(_serve_stored(fs / "data", acked, report))
        except Exception as error:
            report.fail(
                f"serve: the folder does not reopen after the disk was full: {type(error).__name__}: {error}"
            )
    report.figures["faults_injected"] = 2
    report.figures["filesystem_mb"] = SIZE_MB
    return report
