"""Crash campaign: SIGKILL `pigeon serve` under publishers and ordered and shared consumers.

The clients (`crash_worker`, separate processes that outlive every server) log each
acknowledged publish and each delivery and confirmed ack. The server is killed at a random
moment, restarted on the same folder and port, and after each restart the logs are checked
against what it serves (`Checker`): the stream's last offsets cover every acknowledged publish
and never move back, no offset holds two messages, no group's committed offset moves back, no
message is delivered to a group after its ack was confirmed, and every delivered payload is
intact. After the last cycle the server is stopped cleanly and the folder is read with the
engine: every acknowledged message is there, once, where its ack said, unaltered.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pigeon.engine import Engine
from pigeon.errors import CorruptLogError, PigeonError
from pigeon.transport import StreamSpec, connect
from serve_process import Served

from .common import LogTail, Report, payload_ok
from .crash_worker import OPTIONS, PARTITIONS, STREAM

BENCHMARKS = Path(__file__).resolve().parent.parent
GROUPS = ("ordered", "shared")


class Checker:
    """The invariants, fed with log lines as they come and with what the server reports."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.acked: dict[str, tuple[int, int]] = {}  # message id -> where its first ack put it
        self.holder: dict[tuple[int, int], str] = {}  # (partition, offset) -> message id
        self.highest_acked = [-1] * PARTITIONS
        self.last_offsets = [-1] * PARTITIONS
        self.committed: dict[str, list[int]] = {g: [0] * PARTITIONS for g in GROUPS}
        # Per group and (partition, offset): the latest fetch start that delivered it and the
        # first confirmed ack; a delivery fetched after the ack is the invariant broken.
        self.delivered: dict[str, dict[tuple[int, int], int]] = {g: {} for g in GROUPS}
        self.ack_confirmed: dict[str, dict[tuple[int, int], int]] = {g: {} for g in GROUPS}
        self.after_ack: set[tuple[str, int, int]] = set()
        self.counts: Counter[str] = Counter()

    def publisher_lines(self, lines: list[list[str]]) -> None:
        for _, _stamp, msg_id, p, o, duplicate in lines:
            where = (int(p), int(o))
            self.counts["publishes_acknowledged"] += 1
            first = self.acked.setdefault(msg_id, where)
            if first != where:
                self.counts["duplicates_stored"] += 1
                self.report.fail(f"{msg_id} acknowledged at {first} and again at {where}")
            elif duplicate == "1":
                self.counts["duplicate_acks"] += 1
            holder = self.holder.setdefault(where, msg_id)
            if holder != msg_id:
                self.counts["offset_reused"] += 1
                self.report.fail(f"offset {where} acknowledged for {holder} and for {msg_id}")
            self.highest_acked[where[0]] = max(self.highest_acked[where[0]], where[1])

    def consumer_lines(self, group: str, lines: list[list[str]]) -> None:
        delivered, confirmed = self.delivered[group], self.ack_confirmed[group]
        for kind, stamp, p, o, *rest in lines:
            where, at = (int(p), int(o)), int(stamp)
            if kind == "d":
                self.counts[f"{group}_deliveries"] += 1
                if rest[1] != "1":
                    self.counts["corrupt_records_served"] += 1
                    self.report.fail(f"{group} got a damaged or misplaced message {rest[0]} at {where}")
                delivered[where] = max(delivered.get(where, at), at)
            else:
                self.counts[f"{group}_acks_confirmed"] += 1
                confirmed[where] = min(confirmed.get(where, at), at)
            late = where in confirmed and delivered.get(where, -1) > confirmed[where]
            if late and (group, *where) not in self.after_ack:
                self.after_ack.add((group, *where))
                self.report.fail(f"{group}: {where} delivered again after its ack was confirmed")

    def served(self, last_offsets: list[int], committed: dict[str, list[int]], cycle: int) -> None:
        for p, (before, now) in enumerate(zip(self.last_offsets, last_offsets, strict=True)):
            if now < before:
                self.counts["offset_regressions"] += 1
                self.report.fail(f"cycle {cycle}: partition {p} last offset went from {before} to {now}")
            if now < self.highest_acked[p]:
                self.counts["lost"] += self.highest_acked[p] - now
                self.report.fail(
                    f"cycle {cycle}: partition {p} ends at {now}, offset {self.highest_acked[p]} was acked"
                )
        self.last_offsets = [max(a, b) for a, b in zip(self.last_offsets, last_offsets, strict=True)]
        for group, offsets in committed.items():
            for p, (before, now) in enumerate(zip(self.committed[group], offsets, strict=True)):
                if now < before:
                    self.counts["offset_regressions"] += 1
                    self.report.fail(f"cycle {cycle}: {group} committed {p} went from {before} to {now}")
            self.committed[group] = [max(a, b) for a, b in zip(self.committed[group], offsets, strict=True)]

    async def stored(self, data: Path) -> None:
        """Read the stopped server's folder: every acknowledged message, once, intact."""
        seen: dict[str, tuple[int, int]] = {}
        async with await Engine.open(data) as engine:
            for p in range(PARTITIONS):
                try:
                    async for m in engine.read(STREAM, p):
                        self.counts["messages_checked"] += 1
                        if not payload_ok(m.id, m.payload):
                            self.counts["corrupt_records_served"] += 1
                            self.report.fail(f"stored message at {(p, m.offset)} is damaged: {m.id}")
                        elif seen.setdefault(m.id, (p, m.offset)) != (p, m.offset):
                            self.counts["duplicates_stored"] += 1
                            self.report.fail(f"{m.id} stored at {seen[m.id]} and at {(p, m.offset)}")
                except CorruptLogError as error:
                    self.counts["corrupt_records_served"] += 1
                    self.report.fail(f"partition {p} unreadable: {error}")
        for msg_id, where in self.acked.items():
            if seen.get(msg_id) != where:
                self.counts["lost"] += 1
                self.report.fail(f"{msg_id} acknowledged at {where}, stored at {seen.get(msg_id)}")


async def _create_stream(url: str) -> None:
    async with await connect(url, OPTIONS) as transport:
        await transport.create_stream(StreamSpec(STREAM, ("rel.>",), partitions=PARTITIONS))


async def _served_state(url: str) -> tuple[list[int], dict[str, list[int]]]:
    async with await connect(url, OPTIONS) as transport:
        state = await transport.stream_state(STREAM)
        committed = {}
        for group in GROUPS:
            try:
                committed[group] = [lag.committed for lag in await transport.lag(STREAM, group)]
            except PigeonError:
                continue  # not created yet: its first member has not joined
        return list(state.last_offsets), committed


class CrashCampaign:
    def __init__(
        self,
        work: Path,
        *,
        seed: int,
        publishers: int = 2,
        members: int = 2,
        load_s: tuple[float, float] = (0.0, 1.0),
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.seed = seed
        self.load_s = load_s
        self.log = log
        self.report = Report("crash")
        self.checker = Checker(self.report)
        # (role, log name, arguments) per client process; a consumer's log name starts with its group.
        self.workers = [("publish", f"pub{i}", [f"pub{i}", str(seed * 100 + i)]) for i in range(publishers)]
        self.workers += [("consume", f"{g}-{i}", [g, f"{g}{i}"]) for g in GROUPS for i in range(members)]
        self.tails = {name: LogTail(work / f"{name}.log") for _, name, _ in self.workers}

    def _spawn(self, url: str) -> list[subprocess.Popen[bytes]]:
        path = os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))
        procs = []
        for role, name, args in self.workers:
            command = [
                sys.executable,
                "-m",
                "reliability_lib.crash_worker",
                role,
                url,
                str(self.work / f"{name}.log"),
            ]
            with open(self.work / f"{name}.err", "ab") as err:
                procs.append(
                    subprocess.Popen(
                        [*command, *args],
                        env={**os.environ, "PYTHONPATH": path},
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        return procs

    def _ingest(self) -> None:
        for role, name, _ in self.workers:
            lines = self.tails[name].new_lines()
            if role == "publish":
                self.checker.publisher_lines(lines)
            else:
                self.checker.consumer_lines(name.split("-")[0], lines)

    def _await_load(self, timeout: float = 15.0) -> None:
        """Wait until every kind of client made progress since the last kill: each kill then
        lands under the mixed load, not while the clients are still reconnecting."""
        watched = ("publishes_acknowledged", *(f"{g}_deliveries" for g in GROUPS))
        before = [self.checker.counts[name] for name in watched]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._ingest()
            if all(self.checker.counts[n] > b for n, b in zip(watched, before, strict=True)):
                return
            time.sleep(0.05)
        self.log(f"no progress in {timeout} s: {dict(self.checker.counts)}")

    def run(self, cycles: int) -> Report:
        self.work.mkdir(parents=True, exist_ok=True)
        data = self.work / "data"
        started = time.monotonic()
        server = Served(data).wait_listening(30)
        port, url = server.port, server.nats_url
        asyncio.run(_create_stream(url))
        workers = self._spawn(url)
        kills = 0
        try:
            for cycle in range(cycles):
                self._await_load()
                time.sleep(self.rng.uniform(*self.load_s))
                server.kill()
                kills += 1
                time.sleep(self.rng.uniform(0, 0.3))  # clients see the server gone mid-request
                try:
                    server = Served(data, port).wait_listening(30)
                except AssertionError as error:
                    self.report.fail(f"cycle {cycle}: pigeon serve did not come back: {error}")
                    break
                self._ingest()
                self.checker.served(*asyncio.run(_served_state(url)), cycle)
                self.log(f"cycle {cycle}: {dict(self.checker.counts)}")
        finally:
            for proc in workers:
                proc.kill()
                proc.wait(10)
            self._ingest()
            code = server.stop()
        if code != 0:
            self.report.fail(f"the final clean stop exited {code}: {server.stderr()[-2000:]}")
        asyncio.run(self.checker.stored(data))
        counts = self.checker.counts
        self.report.figures = {
            "cycles": kills,
            "faults_injected": kills,
            "seed": self.seed,
            "publishes_acknowledged": counts["publishes_acknowledged"],
            "distinct_messages_acknowledged": len(self.checker.acked),
            **{
                f"{g}_{what}": counts[f"{g}_{what}"]
                for g in GROUPS
                for what in ("deliveries", "acks_confirmed")
            },
            "messages_checked": counts["messages_checked"],
            "lost": counts["lost"],
            "duplicates_stored": counts["duplicates_stored"],
            "duplicates_after_ack": len(self.checker.after_ack),
            "offset_regressions": counts["offset_regressions"] + counts["offset_reused"],
            "corrupt_records": counts["corrupt_records_served"],
            "seconds": round(time.monotonic() - started, 1),
        }
        for name, minimum in (
            ("publishes_acknowledged", 1),
            ("ordered_acks_confirmed", 1),
            ("shared_acks_confirmed", 1),
        ):
            if self.report.figures[name] < minimum:
                self.report.fail(f"no load: {name} is {self.report.figures[name]}")
        return self.report


def run(work: Path, cycles: int, seed: int, log: Callable[[str], None]) -> Report:
    return CrashCampaign(work, seed=seed, log=log).run(cycles)
