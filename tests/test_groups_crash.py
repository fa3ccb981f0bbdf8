"""Durability of consumer groups under SIGKILL: at least once, never again after an ack.

A worker process (``tests/group_crash_worker.py``) opens the engine on one data folder,
publishes keyed messages with unique payloads and consumes them with a shared group and two
ordered groups (commit modes ``message`` and ``batch``), logging every message it processes
*before* settling it and every ack *after* the ack returned (see the worker's docstring). The
parent SIGKILLs it at random moments (sometimes while it is still opening the folder) and
starts it again, over and over, in random roles (publish and consume, only publish, only
consume); then one last worker drains every group to lag 0 and exits cleanly. Checked then:

* every acknowledged publish is stored unaltered, and every stored message was processed at
  least once by each group (with the payload that was stored);
* no message whose ack returned was ever processed again by the same group (for the ordered
  groups an ack that returned is a commit: per message, or for the whole fetched batch);
* ordered groups: per partition, messages were first processed in offset order;
* every group's lag is 0 after the drain, and still 0 once the folder is opened again.

``PIGEON_GROUP_CRASH_CYCLES`` (default 20) sets the number of kills per variant,
``PIGEON_GROUP_CRASH_SEED`` the seed (printed with every failure).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pigeon.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import group_crash_worker as worker

CYCLES = int(os.environ.get("PIGEON_GROUP_CRASH_CYCLES", "20"))
SEED = int(os.environ.get("PIGEON_GROUP_CRASH_SEED", "20250612"))
ROLES = ("mixed", "consume", "publish")
ROLE_WEIGHTS = (70, 15, 15)


@dataclass
class GroupReport:
    processed: int = 0  # processing lines
    distinct: int = 0  # distinct messages processed
    reprocessed: int = 0  # messages processed more than once (allowed before their ack)
    acked: int = 0


@dataclass
class Campaign:
    """Kill loop, drain and checks on one data folder; ``problems`` collects every finding."""

    work: Path
    seed: int
    durability: str
    compact_every: int | None  # state-log events per snapshot; None: the engine's default
    history: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = self.work / "data"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rnd = random.Random(f"{self.seed}/{self.durability}/{self.compact_every}")
        self.torn_lines = 0

    def _command(self, cycle: int, role: str) -> list[str]:
        return [
            sys.executable, str(worker.WORKER), str(self.data), str(self.logs),
            "--seed", str(self.seed), "--cycle", str(cycle), "--role", role,
            "--durability", self.durability,
        ] + ([] if self.compact_every is None else ["--compact-every", str(self.compact_every)])

    # -- the kill loop -------------------------------------------------------------------------

    def kill_cycle(self, cycle: int) -> None:
        role = self.rnd.choices(ROLES, ROLE_WEIGHTS)[0]
        early = self.rnd.random() < 0.15  # killed while opening (recovering) the folder
        delay = self.rnd.uniform(0.0, 0.3) if early else self.rnd.uniform(0.05, 0.8)
        out_path, err_path = self.work / "stdout.txt", self.work / "stderr.txt"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            command = self._command(cycle, role)
            proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            try:
                ready = early or _wait_ready(proc, out_path)
                time.sleep(delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                status = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.history.append(
            f"cycle {cycle}: {role}, killed {delay * 1000:.0f} ms after "
            + ("start" if early else "ready" if ready else "a start that never became ready")
        )
        if status != -signal.SIGKILL or not ready:
            self.problems.append(
                f"cycle {cycle} ({role}): the worker exited by itself with status {status} "
                f"(ready: {ready}); stderr:\n{err_path.read_text()[-3000:]}"
            )
        self._cut_torn_lines()

    def _cut_torn_lines(self) -> None:
        """A line the kill cut (no newline) was never written: drop it before the next worker
        appends, or it would merge with the next line."""
        for path in self.logs.glob("*.log"):
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.torn_lines += 1
                os.truncate(path, data.rfind(b"\n") + 1)

    def drain(self) -> dict[str, list[int]] | None:
        started = time.monotonic()
        done = subprocess.run(
            self._command(10**6, "drain"), capture_output=True, text=True, timeout=120, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("drained ")]
        if done.returncode != 0 or not lines:
            self.problems.append(
                f"the drain failed with status {done.returncode}: {done.stdout[-500:]}\n{done.stderr[-3000:]}"
            )
            return None
        lags: dict[str, list[int]] = json.loads(lines[0].removeprefix("drained "))
        self.history.append(f"drained in {time.monotonic() - started:.1f} s")
        return lags

    # -- the checks ----------------------------------------------------------------------------

    def check(self) -> dict[str, GroupReport]:
        published = self._published()
        stored, lags = asyncio.run(self._reopen())
        for key, payload in published.items():
            if stored.get(key) != payload:
                self.problems.append(
                    f"acknowledged publish {payload!r} at {key} reads back as {stored.get(key)!r}"
                )
        for group, partitions in lags.items():
            if any(partitions):
                self.problems.append(f"{group}: lag {partitions} after the drain and a reopen")
        return {group: self._check_group(group, stored, published) for group in worker.GROUPS}

    def _published(self) -> dict[tuple[int, int], str]:
        published: dict[tuple[int, int], str] = {}
        where: dict[str, tuple[int, int]] = {}
        path = self.logs / "published.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            p, o, payload = line.split(" ")
            key = (int(p), int(o))
            if key in published or payload in where:
                self.problems.append(
                    f"publish of {payload!r} acknowledged at {key}, but {key} was acknowledged for "
                    f"{published.get(key)!r} and {payload!r} at {where.get(payload)}"
                )
            published[key] = payload
            where[payload] = key
        return published

    async def _reopen(self) -> tuple[dict[tuple[int, int], str], dict[str, list[int]]]:
        engine = await Engine.open(self.data)
        try:
            stored: dict[tuple[int, int], str] = {}
            for p in range(worker.PARTITIONS):
                async for message in engine.read(worker.STREAM, p):
                    assert message.offset is not None
                    stored[(p, message.offset)] = message.payload.decode()
            lags = {g: [lag.lag for lag in engine.group_lag(worker.STREAM, g)] for g in worker.GROUPS}
        finally:
            await engine.close()
        if len(set(stored.values())) != len(stored):
            self.problems.append("a payload is stored twice: a message was published twice")
        return stored, lags

    def _check_group(
        self, group: str, stored: dict[tuple[int, int], str], published: dict[tuple[int, int], str]
    ) -> GroupReport:
        report = GroupReport()
        acked_at: dict[tuple[int, int], int] = {}
        seen: dict[tuple[int, int], int] = {}
        first_order: dict[int, list[int]] = {p: [] for p in range(worker.PARTITIONS)}
        problems: list[str] = []
        path = self.logs / f"{group}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        for n, line in enumerate(lines, 1):
            fields = line.split(" ")
            if fields[0] == "ACKED":
                key = (int(fields[1]), int(fields[2]))
                acked_at.setdefault(key, n)
                report.acked += 1
                continue
            name, p, o, payload = fields
            key = (int(p), int(o))
            report.processed += 1
            if name != group:
                problems.append(f"line {n}: {line!r} in the log of group {group}")
            if stored.get(key) != payload:
                problems.append(f"line {n}: processed {payload!r} at {key}, stored is {stored.get(key)!r}")
            if key in acked_at:
                problems.append(
                    f"line {n}: {key} ({payload!r}) processed again after its ack returned (line "
                    f"{acked_at[key]})"
                )
            if key in seen:
                seen[key] += 1
            else:
                seen[key] = 1
                first_order[key[0]].append(key[1])
        report.distinct = len(seen)
        report.reprocessed = sum(1 for count in seen.values() if count > 1)
        never = sorted(key for key in stored if key not in seen)
        if never:
            unpublished = sum(1 for key in never if key not in published)
            problems.append(
                f"{len(never)} stored messages never processed ({len(never) - unpublished} of them "
                f"acknowledged publishes), e.g. {never[:10]}"
            )
        if group in worker.ORDERED_GROUPS:
            for p, offsets in first_order.items():
                wrong = [(a, b) for a, b in itertools.pairwise(offsets) if b <= a]
                if wrong:
                    problems.append(f"partition {p}: first processed out of offset order at {wrong[:5]}")
        self.problems += [f"{group}: {problem}" for problem in problems[:20]]
        return report


def _wait_ready(proc: subprocess.Popen[bytes], out_path: Path) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if out_path.stat().st_size >= len("ready\n"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def run_campaign(tmp_path: Path, durability: str, compact_every: int | None, cycles: int) -> None:
    campaign = Campaign(tmp_path, SEED, durability, compact_every)
    reproduce = (
        f"seed {SEED}, durability {durability}, snapshot every {compact_every or 'default'} events; "
        f"reproduce with PIGEON_GROUP_CRASH_SEED={SEED} PIGEON_GROUP_CRASH_CYCLES={cycles}; "
        f"folder {campaign.work}"
    )

    def fail(what: str) -> None:
        pytest.fail(
            f"{what} ({reproduce})\n" + "\n".join(campaign.problems[:40])
            + "\n-- history --\n" + "\n".join(campaign.history[-8:])
        )

    for cycle in range(cycles):
        campaign.kill_cycle(cycle)
        if campaign.problems:
            fail(f"after kill {cycle}")
    lags = campaign.drain()
    if campaign.problems:
        fail("draining")
    assert lags is not None
    for group, partitions in lags.items():
        if any(partitions):
            campaign.problems.append(f"{group}: lag {partitions} when the drain finished")
    reports = campaign.check()
    if campaign.problems:
        fail("checking")
    print(f"{reproduce}: {campaign.torn_lines} torn log lines; {campaign.history[-1]}")
    for group, report in reports.items():
        print(f"  {group}: {report}")
    # The run must have exercised something: messages, and redeliveries caused by the kills.
    assert min(r.distinct for r in reports.values()) >= 100, reports
    assert sum(r.reprocessed for r in reports.values()) > 0, reports


@pytest.mark.slow
def test_sigkill_groups_always(tmp_path: Path) -> None:
    # The engine's own snapshot interval: no snapshot happens in a run this short.
    run_campaign(tmp_path, "always", None, CYCLES)


@pytest.mark.slow
def test_sigkill_groups_interval_with_frequent_snapshots(tmp_path: Path) -> None:
    # A SIGKILL is not a power loss: a settle that returned has reached the OS. Snapshots of
    # the group state (and the compaction of its log) every 400 events, so kills hit them.
    run_campaign(tmp_path, "interval", 400, CYCLES)


@pytest.mark.slow
def test_sigkill_groups_always_with_frequent_snapshots(tmp_path: Path) -> None:
    run_campaign(tmp_path, "always", 100, CYCLES)


# == stopping consumers ==========================================================================


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_cancelling_a_woken_fetch_cancels_it(tmp_path: Path, kind: str) -> None:
    from pigeon.engine import OrderedGroupConfig, SharedGroupConfig, StreamConfig

    engine = await Engine.open(tmp_path / "data")
    try:
        await engine.create_stream(StreamConfig("s", ("s.>",), partitions=1))
        if kind == "shared":
            member = (await engine.shared_group("s", SharedGroupConfig("g"))).member("m")
        else:
            member = await (await engine.ordered_group("s", OrderedGroupConfig("g"))).join("m")
        fetch = asyncio.ensure_future(member.fetch(10, 5.0))
        await asyncio.sleep(0.01)  # long-polling now
        # The publish task's first step stores the message and wakes the fetch; this task
        # resumes right after that step and cancels the fetch before it has run again.
        publish = asyncio.ensure_future(engine.publish("s.x", b"x"))
        await asyncio.sleep(0)
        assert engine.stream_info("s").messages == 1 and not fetch.done()
        fetch.cancel()
        await publish
        outcome = (await asyncio.gather(fetch, return_exceptions=True))[0]
        assert fetch.cancelled(), f"the cancelled fetch returned {outcome!r}"
    finally:
        await engine.close()
