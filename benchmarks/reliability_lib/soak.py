"""Soak campaign: `pigeon serve` for a long run at half its measured maximum throughput.

First the maximum: a publisher sends batches into a scratch stream as fast as a shared group
acknowledging everything keeps up (it never runs more than `BACKLOG` messages ahead), and the
rate is what the group acknowledged per second. Then, on a fresh stream, for the run's length:

- one publisher offers half that rate, each payload stamped with the moment it is due, so a
  publisher held up by the server does not hide the wait (latency counts from the due time);
- a fast shared group fetches large batches and acknowledges everything;
- a slow ordered group on the same stream handles a tenth of the rate (it sleeps per message),
  so its lag grows all along.

Every few seconds a sample: the server's RSS, the fast group's latency (delivery minus due
time) over the interval, both groups' lag. The first `WARM_UP` of the run is warm-up. Failed
invariants: RSS at the end more than 10% above RSS after warm-up; the fast group's p99 over the
last tenth of the run above `LATENCY_FACTOR` times that of the first tenth after warm-up (or
`LATENCY_FLOOR_MS`, whichever is higher; over a tenth: the median of its intervals' p99, so one
scheduler stall on a shared machine is not read as drift); the fast group trailing by more than `LAG_BOUND_S`
of messages after warm-up, or the slow group's lag not growing (then nothing was shown); a
published message the fast group had not acknowledged after the publisher stopped and it drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pigeon.message import Message
from pigeon.transport import Consumer, ConsumerSpec, StreamSpec, Transport, connect
from serve_process import Served

from .common import Report, percentile, rss_bytes

STREAM, CALIBRATION_STREAM = "soak", "calibration"
PARTITIONS = 2
FAST, SLOW = "fast", "slow"
STAMP = struct.Struct("!QQ")  # sequence number, due time (time.monotonic_ns)
PADDING = bytes(100 - STAMP.size)
FAST_BATCH = 500
# The server keeps every lease's expiry entry for ack_wait, acked or not: a long wait would show
# up as RSS growing for that long after warm-up. The fast group acks within milliseconds.
ACK_WAIT_S = 5.0
SLOW_BATCH = 10
SLOW_SHARE = 10  # the slow group handles at most 1/SLOW_SHARE of the offered rate
# An overdue publisher catches up in requests of at most this many messages.
PUBLISH_BATCH = 500
CALIBRATION_BATCH = 100
BACKLOG = 4 * FAST_BATCH
CALIBRATE_S = 10.0
SAMPLE_S = 5.0
WARM_UP = 0.1
RSS_GROWTH_MAX_PCT = 10.0
LATENCY_FACTOR, LATENCY_FLOOR_MS = 3.0, 100.0
LAG_BOUND_S = 5.0
DRAIN_S = 30.0
POLL_S = 0.2  # fetch timeout: how soon an idle consumer notices it should stop


def subject(stream: str) -> str:
    return f"{stream}.events"


def payload(seq: int, due_ns: int) -> bytes:
    return STAMP.pack(seq, due_ns) + PADDING


class Tally:
    """What the clients saw. Acks are kept as one byte per sequence number, so a 20-minute run
    at thousands of messages a second costs the client megabytes, not a set of ints."""

    def __init__(self) -> None:
        self.published = 0  # sequence numbers below this were acknowledged by the server
        self.acked = bytearray()
        self.distinct_acked = 0
        self.redelivered = 0
        self.latencies_ms: list[float] = []  # the fast group's, since the last sample

    def delivered(self, message: Message, now_ns: int) -> int:
        seq, due_ns = STAMP.unpack_from(message.payload)
        self.latencies_ms.append((now_ns - due_ns) / 1e6)
        return int(seq)

    def acknowledged(self, seqs: Sequence[int]) -> None:
        if seqs and max(seqs) >= len(self.acked):
            self.acked.extend(bytes(max(seqs) + 1 - len(self.acked) + 64 * 1024))
        for seq in seqs:
            if self.acked[seq]:
                self.redelivered += 1
            else:
                self.acked[seq] = 1
                self.distinct_acked += 1

    def missing(self) -> int:
        return self.published - self.acked.count(1, 0, self.published)


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss: int
    p50_ms: float
    p99_ms: float
    delivered: int
    fast_lag: int
    slow_lag: int


async def _ack_everything(consumer: Consumer, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        received = await consumer.fetch(FAST_BATCH, POLL_S)
        now = time.monotonic_ns()
        seqs = [tally.delivered(r.message, now) for r in received]
        # One request per ack: sent together, the batch costs one round trip, not hundreds.
        await asyncio.gather(*(r.ack() for r in received))
        tally.acknowledged(seqs)


async def _ack_slowly(consumer: Consumer, delay_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for r in await consumer.fetch(SLOW_BATCH, POLL_S):
            await asyncio.sleep(delay_s)
            await r.ack()


async def _publish(transport: Transport, messages: list[Message]) -> None:
    acks = await transport.publish_batch(messages)
    if any(ack is None for ack in acks):
        raise AssertionError("a publish was not stored: the stream captures every subject of the campaign")


async def _flood(transport: Transport, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if tally.published - tally.distinct_acked > BACKLOG:
            await asyncio.sleep(0.001)
            continue
        now = time.monotonic_ns()
        first = tally.published
        batch = [
            Message(subject(CALIBRATION_STREAM), payload(s, now))
            for s in range(first, first + CALIBRATION_BATCH)
        ]
        await _publish(transport, batch)
        tally.published = first + len(batch)


async def _offer(transport: Transport, tally: Tally, rate: float, seconds: float) -> None:
    total = int(rate * seconds)
    step_ns = 1e9 / rate
    start = time.monotonic_ns()
    seq = 0
    while seq < total:
        now = time.monotonic_ns()
        due = min(total, int((now - start) / step_ns) + 1)
        if due <= seq:
            await asyncio.sleep((start + seq * step_ns - now) / 1e9)
            continue
        upto = min(due, seq + PUBLISH_BATCH)
        batch = [Message(subject(STREAM), payload(s, start + int(s * step_ns))) for s in range(seq, upto)]
        await _publish(transport, batch)
        tally.published = seq = upto


async def _group_lag(transport: Transport, group: str) -> int:
    return sum(p.lag for p in await transport.lag(STREAM, group))


async def _calibrate(url: str, seconds: float) -> float:
    """Messages per second published and acknowledged by one fast member, publisher held back
    to what the group keeps up with."""
    tally, stop = Tally(), asyncio.Event()
    async with await connect(url) as publisher, await connect(url) as reader:
        await publisher.create_stream(
            StreamSpec(CALIBRATION_STREAM, (subject(CALIBRATION_STREAM),), PARTITIONS)
        )
        consumer = await reader.consumer(CALIBRATION_STREAM, ConsumerSpec(FAST, ack_wait_s=ACK_WAIT_S))
        tasks = [
            asyncio.create_task(_flood(publisher, tally, stop)),
            asyncio.create_task(_ack_everything(consumer, tally, stop)),
        ]
        started = time.monotonic()
        await asyncio.sleep(seconds)
        acked, elapsed = tally.distinct_acked, time.monotonic() - started
        stop.set()
        await asyncio.gather(*tasks)
        await consumer.close()
        await publisher.delete_stream(CALIBRATION_STREAM)
    return acked / elapsed


class Soak:
    def __init__(self, url: str, pid: int, rate: float, seconds: float, log: Callable[[str], None]) -> None:
        self.url = url
        self.pid = pid
        self.rate = rate
        self.seconds = seconds
        self.interval = min(SAMPLE_S, seconds * WARM_UP)
        self.log = log
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.drained_s = 0.0

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            publisher, fast, slow, monitor = [
                await stack.enter_async_context(await connect(self.url)) for _ in range(4)
            ]
            await publisher.create_stream(StreamSpec(STREAM, (subject(STREAM),), PARTITIONS))
            fast_member = await fast.consumer(STREAM, ConsumerSpec(FAST, ack_wait_s=ACK_WAIT_S))
            slow_member = await slow.consumer(STREAM, ConsumerSpec(SLOW, kind="ordered"))
            stop_fast, stop_slow = asyncio.Event(), asyncio.Event()
            consumers = [
                asyncio.create_task(_ack_everything(fast_member, self.tally, stop_fast)),
                asyncio.create_task(_ack_slowly(slow_member, SLOW_SHARE / self.rate, stop_slow)),
            ]
            try:
                await asyncio.gather(
                    _offer(publisher, self.tally, self.rate, self.seconds), self._sample(monitor)
                )
                drain_started = time.monotonic()
                while time.monotonic() - drain_started < DRAIN_S:
                    if not self.tally.missing():
                        break
                    await asyncio.sleep(0.05)
                self.drained_s = time.monotonic() - drain_started
            finally:
                stop_fast.set()
                stop_slow.set()
                await asyncio.gather(*consumers, return_exceptions=True)
            for task in consumers:
                if (error := task.exception()) is not None:
                    raise error

    async def _sample(self, monitor: Transport) -> None:
        started = time.monotonic()
        at = self.interval
        while at <= self.seconds + 1e-6:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            latencies, self.tally.latencies_ms = self.tally.latencies_ms, []
            sample = Sample(
                at_s=round(at, 1),
                rss=rss_bytes(self.pid),
                p50_ms=percentile(latencies, 0.5),
                p99_ms=percentile(latencies, 0.99),
                delivered=len(latencies),
                fast_lag=await _group_lag(monitor, FAST),
                slow_lag=await _group_lag(monitor, SLOW),
            )
            self.samples.append(sample)
            self.log(f"soak {sample}")
            at += self.interval

    def judge(self, report: Report) -> None:
        warm = [s for s in self.samples if s.at_s >= self.seconds * WARM_UP - 1e-6]
        if len(warm) < 2:
            report.fail(f"only {len(self.samples)} samples: too short a run to judge")
            return
        base, last, after = warm[0], warm[-1], warm[1:]
        window = max(1, round(len(self.samples) * WARM_UP))
        first = _typical(after[:window])
        final = _typical(after[-window:])
        growth = 100.0 * (last.rss - base.rss) / base.rss
        latency_limit = max(LATENCY_FACTOR * first[1], LATENCY_FLOOR_MS)
        lag_bound = max(self.rate * LAG_BOUND_S, 2 * FAST_BATCH)
        fast_lag_max = max(s.fast_lag for s in after)
        missing = self.tally.missing()
        report.figures.update(
            {
                "samples": len(self.samples),
                "sample_interval_s": round(self.interval, 1),
                "rss_start_mb": _mb(base.rss),
                "rss_end_mb": _mb(last.rss),
                "rss_max_mb": _mb(max(s.rss for s in after)),
                "rss_growth_pct": round(growth, 1),
                "latency_p50_ms_first": round(first[0], 1),
                "latency_p99_ms_first": round(first[1], 1),
                "latency_p50_ms_last": round(final[0], 1),
                "latency_p99_ms_last": round(final[1], 1),
                "latency_p99_ms_worst_interval": round(max(s.p99_ms for s in after), 1),
                "fast_lag_max": fast_lag_max,
                "slow_lag_after_warm_up": base.slow_lag,
                "slow_lag_end": last.slow_lag,
                "messages_published": self.tally.published,
                "messages_checked": self.tally.distinct_acked,
                "fast_redeliveries": self.tally.redelivered,
                "lost": missing,
                "drain_s": round(self.drained_s, 1),
            }
        )
        if growth > RSS_GROWTH_MAX_PCT:
            report.fail(f"RSS grew {growth:.1f}% after warm-up ({_mb(base.rss)} -> {_mb(last.rss)} MB)")
        if final[1] > latency_limit:
            report.fail(
                f"fast group p99 {final[1]:.1f} ms over the last tenth, above {latency_limit:.1f} ms "
                f"(first tenth after warm-up: {first[1]:.1f} ms)"
            )
        if fast_lag_max > lag_bound:
            report.fail(f"the fast group trailed by {fast_lag_max} messages, above {lag_bound:.0f}")
        if last.slow_lag <= base.slow_lag:
            report.fail(
                f"the slow group's lag did not grow ({base.slow_lag} -> {last.slow_lag}): it was not slow"
            )
        if missing:
            report.fail(
                f"{missing} of {self.tally.published} published messages never acked by the fast group"
            )


def _typical(samples: list[Sample]) -> tuple[float, float]:
    """The median over the samples of their p50 and of their p99."""
    return statistics.median(s.p50_ms for s in samples), statistics.median(s.p99_ms for s in samples)


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


def run(work: Path, minutes: float, log: Callable[[str], None]) -> Report:
    report = Report("soak")
    work.mkdir(parents=True, exist_ok=True)
    seconds = minutes * 60
    server = Served(work / "data").wait_listening(30)
    figures = report.figures
    figures["minutes"] = minutes
    try:
        max_rate = asyncio.run(_calibrate(server.nats_url, min(CALIBRATE_S, seconds / 4)))
        figures["max_rate_msgs_per_s"] = round(max_rate)
        figures["rate_msgs_per_s"] = round(max_rate / 2)
        log(f"soak: maximum {max_rate:.0f} msg/s, offering {max_rate / 2:.0f} msg/s for {seconds:.0f} s")
        soak = Soak(server.nats_url, server.process.pid, max_rate / 2, seconds, log)
        try:
            asyncio.run(soak.run())
        finally:
            soak.judge(report)
    except Exception as error:
        report.fail(f"the campaign stopped: {error!r}")
    finally:
        code = server.stop()
    if code != 0:
        report.fail(f"pigeon serve's clean stop exited {code}: {server.stderr()[-2000:]}")
    return report
