"""Crash-test harness for the storage engine: a writer child process and the parent's checker.

Run as a script it is the *writer*::

    python tests/crash_writer.py DATA_DIR --seed S --cycle C --durability always|interval
                                 [--republish FILE] [--max-seconds N]

It opens the engine on ``DATA_DIR`` (recovering whatever the previous, killed writer left),
creates the stream (a no-op after the first cycle), prints ``ready`` and then publishes from
several concurrent asyncio tasks until it is killed. After every publish call *returned* it
prints one line per acknowledged message, ``partition offset payload_hex``, with a single
``os.write`` on stdout (the parent points stdout at a file, so a line that was printed
survives the SIGKILL). Lines ``dup partition offset 0|1 payload_hex`` report the re-publish
of messages, named in ``--republish``, that an earlier cycle had acknowledged with an
explicit message id (deduplication must survive the crash).

Every message is a pure function of ``(seed, cycle, task, seq)`` (see `message_spec`) and its
payload starts with ``cycle:task:seq:``, so the checker can tell that any stored message is
one that was really published, unaltered, and stored once.

Imported, it is the *parent* side: `CrashCampaign` spawns writers, SIGKILLs them after a
random delay, and checks the folder after each kill (`CrashCampaign.run_cycle`). It is used
by ``tests/test_engine_durability.py`` and ``benchmarks/crash_campaign.py``. The file has no
``test_`` function and its name does not match ``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pigeon.engine import Engine, StreamConfig
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import CorruptLogError
from pigeon.message import Message

STREAM = "crash"
PARTITIONS = 2
SEGMENT_BYTES = 64 * 1024
# What each writer task does: "one" = engine.publish, "batch" = engine.publish_batch (keyed
# and unkeyed messages, split per partition into atomic batches), "many" = engine.publish_many
# (one uniform batch of payloads).
TASK_KINDS = ("one", "one", "one", "one", "batch", "many")
WRITER = Path(__file__).resolve()


def stream_config(durability: str) -> StreamConfig:
    return StreamConfig(
        STREAM,
        ("crash.>",),
        partitions=PARTITIONS,
        durability=durability,  # type: ignore[arg-type]
        fsync_interval_ms=20,
        segment_bytes=SEGMENT_BYTES,
    )


@dataclass(frozen=True)
class Spec:
    """Everything a published message carries."""

    subject: str
    payload: bytes
    key: str | None
    headers: dict[str, str]
    msg_id: str | None


def message_spec(seed: int, cycle: int, task: int, seq: int) -> Spec:
    """The message number ``seq`` of writer task ``task`` in cycle ``cycle`` (deterministic)."""
    kind = TASK_KINDS[task]
    rnd = random.Random(f"{seed}/{cycle}/{task}/{seq}")  # str seeds hash with SHA-512: stable
    roll = rnd.random()
    size = 0 if roll < 0.05 else rnd.randrange(1, 80) if roll < 0.6 else rnd.randrange(80, 1500)
    payload = f"{cycle}:{task}:{seq}:".encode() + rnd.randbytes(size)
    key = msg_id = None
    headers: dict[str, str] = {}
    if kind != "many":
        if rnd.random() < 0.4:
            key = f"key-{rnd.randrange(8)}"
        if rnd.random() < 0.3:
            headers = {"cycle": str(cycle), "x-rand": rnd.randbytes(4).hex()}
        if rnd.random() < 0.3:
            msg_id = f"id-{seed}-{cycle}-{task}-{seq}"
    return Spec(f"crash.{kind}.t{task}", payload, key, headers, msg_id)


def parse_payload(payload: bytes) -> tuple[int, int, int] | None:
    """``(cycle, task, seq)`` from a payload's prefix, or None if it has none."""
    parts = payload.split(b":", 3)
    if len(parts) != 4:
        return None
    try:
        cycle, task, seq = (int(p) for p in parts[:3])
    except ValueError:
        return None
    if not 0 <= task < len(TASK_KINDS) or cycle < 0 or seq < 0:
        return None
    return cycle, task, seq


# -- the writer (child process) --------------------------------------------------------------


def _emit(lines: list[str]) -> None:
    data = "".join(lines).encode()
    while data:  # stdout is a regular file: one write, but be correct about short writes
        data = data[os.write(1, data) :]


def _fail(message: str) -> None:
    os.write(2, f"crash_writer: {message}\n".encode())
    os._exit(5)


async def _writer_task(engine: Engine, seed: int, cycle: int, task: int) -> None:
    kind = TASK_KINDS[task]
    sizes = random.Random(f"{seed}/{cycle}/{task}/sizes")
    seq = 0
    while True:
        if kind == "one":
            spec = message_spec(seed, cycle, task, seq)
            seq += 1
            ack = await engine.publish(
                spec.subject, spec.payload, key=spec.key, headers=spec.headers or None,
                msg_id=spec.msg_id,
            )
            if ack.duplicate:
                _fail(f"fresh message {spec.msg_id} acknowledged as a duplicate")
            _emit([f"{ack.partition} {ack.offset} {spec.payload.hex()}\n"])
        elif kind == "batch":
            specs = [message_spec(seed, cycle, task, seq + i) for i in range(sizes.randint(1, 12))]
            seq += len(specs)
            acks = await engine.publish_batch(
                [Message(s.subject, s.payload, key=s.key, headers=s.headers, id=s.msg_id) for s in specs]
            )
            if acks.duplicates:
                _fail("fresh batch acknowledged with duplicates")
            _emit([f"{a.partition} {a.offset} {s.payload.hex()}\n" for a, s in zip(acks, specs, strict=True)])
        else:
            specs = [message_spec(seed, cycle, task, seq + i) for i in range(sizes.randint(1, 40))]
            seq += len(specs)
            acks = await engine.publish_many(specs[0].subject, [s.payload for s in specs])
            _emit([f"{a.partition} {a.offset} {s.payload.hex()}\n" for a, s in zip(acks, specs, strict=True)])


async def _republish(engine: Engine, seed: int, payloads: list[bytes]) -> None:
    """Publish again messages an earlier cycle had acknowledged (with explicit ids)."""
    for payload in payloads:
        where = parse_payload(payload)
        assert where is not None
        spec = message_spec(seed, *where)
        ack = await engine.publish(
            spec.subject, spec.payload, key=spec.key, headers=spec.headers or None, msg_id=spec.msg_id
        )
        _emit([f"dup {ack.partition} {ack.offset} {int(ack.duplicate)} {payload.hex()}\n"])


async def _write(args: argparse.Namespace, republish: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    # A safety net if the parent died: a writer is meant to be killed, never to finish.
    loop.call_later(args.max_seconds, _fail, f"not killed within {args.max_seconds} s")
    engine = await Engine.open(args.data)
    await engine.create_stream(stream_config(args.durability))
    _emit(["ready\n"])
    await _republish(engine, args.seed, republish)
    await asyncio.gather(
        *(_writer_task(engine, args.seed, args.cycle, t) for t in range(len(TASK_KINDS)))
    )


def writer_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pigeon crash-test writer (killed by its parent)")
    parser.add_argument("data")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--cycle", type=int, required=True)
    parser.add_argument("--durability", choices=("always", "interval"), required=True)
    parser.add_argument("--republish")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    republish = [bytes.fromhex(h) for h in Path(args.republish).read_text().split()] if args.republish else []
    asyncio.run(_write(args, republish))


# -- the parent: kill loop and checks ----------------------------------------------------------


@dataclass
class CycleReport:
    cycle: int
    killed_after_s: float
    waited_for_ready: bool
    acked: int  # messages acknowledged in this cycle
    checked: int  # acknowledged messages (all cycles so far) found intact
    stored: int  # messages in the log after recovery
    lost: int = 0  # acknowledged messages missing or different
    corrupt: int = 0  # CorruptLogError (or any other failure) opening or reading the folder
    problems: list[str] = field(default_factory=list)


class CrashCampaign:
    """Repeated SIGKILLs of writer processes on one data folder, checked after every kill.

    ``acked`` accumulates every acknowledged message over all cycles; after each kill the
    folder must hold every one of them at its acknowledged partition and offset, offsets
    must be dense, every stored message must be one that was published (unaltered, once),
    and whatever a previous check saw stored must still be there.
    """

    def __init__(
        self,
        work: Path,
        *,
        seed: int,
        durability: str,
        max_delay_s: float = 0.35,
        early_kill_probability: float = 0.15,
        soon_kill_probability: float = 0.25,
        in_place_probability: float = 0.3,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.work = work
        self.data = work / "data"
        self.seed = seed
        self.durability = durability
        self.max_delay_s = max_delay_s
        self.early_kill_probability = early_kill_probability
        self.soon_kill_probability = soon_kill_probability
        self.in_place_probability = in_place_probability
        self.log = log or (lambda _line: None)
        self.rnd = random.Random(seed)
        self.cycle = 0
        self.acked: dict[tuple[int, int], bytes] = {}
        # (time, partition, offset) of acks with an explicit message id, oldest first
        self.id_acks: deque[tuple[float, int, int]] = deque()
        self.seen: dict[tuple[int, int], bytes] = {}  # stored at the previous check
        # (partition, offset) -> (message fields, origin) of messages already found valid
        self.valid: dict[tuple[int, int], tuple[tuple[object, ...], tuple[int, int, int]]] = {}
        self.ack_checks = 0
        self.torn_tails = 0  # recoveries (in the checks) that truncated a torn tail
        work.mkdir(parents=True, exist_ok=True)

    # -- one cycle ---------------------------------------------------------------------------

    def run_cycle(self) -> CycleReport:
        cycle = self.cycle
        self.cycle += 1
        out_path = self.work / f"acks-{cycle}.txt"
        err_path = self.work / f"stderr-{cycle}.txt"
        republish = self._pick_republish()
        cmd = [
            sys.executable, str(WRITER), str(self.data), "--seed", str(self.seed),
            "--cycle", str(cycle), "--durability", self.durability,
        ]
        republish_path = self.work / f"republish-{cycle}.txt"
        if republish:
            republish_path.write_text("\n".join(self.acked[k].hex() for k in republish) + "\n")
            cmd += ["--republish", str(republish_path)]
        # When to kill: early = counted from the start (often during start-up or recovery);
        # otherwise after "ready", sometimes very soon (before the first segment roll, so the
        # next recovery starts from a clean close's checkpoint with data after it).
        roll = self.rnd.random()
        early = roll < self.early_kill_probability
        if early:
            delay = self.rnd.uniform(0, 0.25)
        elif roll < self.early_kill_probability + self.soon_kill_probability:
            delay = self.rnd.uniform(0, 0.03)
        else:
            delay = self.rnd.uniform(0, self.max_delay_s)
        problems: list[str] = []
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            try:
                started = time.monotonic()
                if not early and not self._wait_ready(proc, out_path):
                    problems.append(f"writer did not become ready (exit status {proc.poll()})")
                time.sleep(delay)
                killed_after = time.monotonic() - started
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                status = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if status != -signal.SIGKILL:
            problems.append(
                f"writer exited by itself with status {status}: {err_path.read_text()[-2000:]!r}"
            )
        acked_now = self._read_acks(out_path, cycle, republish, problems)
        in_place = self.rnd.random() < self.in_place_probability
        report = self._check(cycle, in_place, problems)
        report.killed_after_s = killed_after
        report.waited_for_ready = not early
        report.acked = acked_now
        if report.problems:
            report.problems = [f"cycle {cycle} (seed {self.seed}): {p}" for p in report.problems]
        self.log(
            f"cycle {cycle}: killed after {killed_after * 1000:.0f} ms "
            f"({'after ready' if not early else 'early'}), {acked_now} acked, "
            f"{report.stored} stored, {report.checked} acks checked"
            f"{', checked in place' if in_place else ''}"
            + (f", PROBLEMS: {len(report.problems)}" if report.problems else "")
        )
        out_path.unlink()
        err_path.unlink()
        republish_path.unlink(missing_ok=True)
        return report

    def _wait_ready(self, proc: subprocess.Popen[bytes], out_path: Path) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if out_path.stat().st_size >= 6:
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.002)
        return False

    def _pick_republish(self) -> list[tuple[int, int]]:
        """A few earlier acks with explicit ids, recent enough to be inside the dedup window."""
        horizon = time.monotonic() - 60  # the stream's window is 120 s
        while self.id_acks and self.id_acks[0][0] < horizon:
            self.id_acks.popleft()
        candidates = [(p, o) for _t, p, o in self.id_acks]
        return self.rnd.sample(candidates, min(len(candidates), 3))

    def _read_acks(
        self, path: Path, cycle: int, republish: list[tuple[int, int]], problems: list[str]
    ) -> int:
        data = path.read_bytes()
        lines = data.split(b"\n")[:-1]  # a line cut by the kill (no newline) was never complete
        count = 0
        now = time.monotonic()
        for raw in lines:
            fields = raw.decode().split()
            if fields == ["ready"]:
                continue
            if fields[0] == "dup":
                p, o, dup = int(fields[1]), int(fields[2]), fields[3] == "1"
                payload = bytes.fromhex(fields[4])
                original = [k for k in republish if self.acked[k] == payload]
                if not dup or not original or original[0] != (p, o):
                    problems.append(
                        f"re-publish of acknowledged {original} with its message id returned "
                        f"({p}, {o}, duplicate={dup}): deduplication forgot it across the crash"
                    )
                continue
            p, o, payload = int(fields[0]), int(fields[1]), bytes.fromhex(fields[2])
            previous = self.acked.get((p, o))
            if previous is not None and previous != payload:
                problems.append(
                    f"offset {o} of partition {p} acknowledged twice: first for "
                    f"{parse_payload(previous)}, now for {parse_payload(payload)}"
                )
                continue
            self.acked[(p, o)] = payload
            where = parse_payload(payload)
            if where is None:
                problems.append(f"acknowledged payload {payload[:40]!r} was never published")
            elif TASK_KINDS[where[1]] != "many" and message_spec(self.seed, *where).msg_id is not None:
                self.id_acks.append((now, p, o))
            count += 1
        return count

    # -- checking ----------------------------------------------------------------------------

    def _check(self, cycle: int, in_place: bool, problems: list[str]) -> CycleReport:
        if in_place:
            target = self.data
        else:
            target = self.work / "check"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.data, target)
        report = CycleReport(cycle, 0.0, True, 0, 0, 0, problems=problems)
        counter = _TornTailCounter()
        engine_log = logging.getLogger("pigeon.engine")
        engine_log.addHandler(counter)
        try:
            asyncio.run(self._check_folder(target, report))
        finally:
            engine_log.removeHandler(counter)
        self.torn_tails += counter.count
        if not in_place:
            shutil.rmtree(target, ignore_errors=True)
        return report

    async def _check_folder(self, target: Path, report: CycleReport) -> None:
        problems = report.problems
        try:
            engine = await Engine.open(target)
        except CorruptLogError as exc:
            report.corrupt += 1
            problems.append(f"opening the folder raised {exc!r} (path={exc.path}, position={exc.position})")
            report.lost = len(self.acked)
            return
        try:
            stored = await self._read_all(engine, report)
        except Exception as exc:  # any failure to read is a finding
            report.corrupt += 1
            problems.append(f"reading raised {exc!r}")
            report.lost = len(self.acked)
            return
        finally:
            await engine.close()
        for key, payload in self.acked.items():
            found = stored.get(key)
            if found is None or found.payload != payload:
                report.lost += 1
                if report.lost <= 10:
                    problems.append(
                        f"acknowledged {parse_payload(payload)} at partition {key[0]} offset {key[1]} "
                        + ("is missing" if found is None else f"reads back as {parse_payload(found.payload)}")
                    )
            else:
                report.checked += 1
        self.ack_checks += report.checked
        vanished = [k for k, payload in self.seen.items() if k not in stored or stored[k].payload != payload]
        if vanished:
            problems.append(
                f"{len(vanished)} messages stored at the previous check changed or vanished, "
                f"e.g. partition/offset {vanished[:5]}"
            )
        self.seen = {k: m.payload for k, m in stored.items()}
        report.stored = len(stored)

    async def _read_all(self, engine: Engine, report: CycleReport) -> dict[tuple[int, int], Message]:
        problems = report.problems
        stored: dict[tuple[int, int], Message] = {}
        if STREAM not in engine.streams():
            if self.acked:
                problems.append("the stream is gone")
            return stored
        info = engine.stream_info(STREAM)
        origins: dict[tuple[int, int, int], tuple[int, int]] = {}
        for p in range(PARTITIONS):
            expected = 0
            async for m in engine.read(STREAM, p):
                assert m.offset is not None
                if m.offset != expected:
                    problems.append(f"partition {p}: offset {m.offset} follows {expected - 1} (not dense)")
                expected = m.offset + 1
                stored[(p, m.offset)] = m
                self._check_message(m, p, origins, problems)
            if expected != info.partitions[p].next_offset:
                problems.append(
                    f"partition {p}: read ends at {expected} but next_offset is "
                    f"{info.partitions[p].next_offset}"
                )
        # Random access goes through the index that recovery rebuilt.
        for p, o in self.rnd.sample(list(stored), min(len(stored), 20)):
            got = engine.fetch(STREAM, p, o, 1)
            if not got or got[0].offset != o or got[0].payload != stored[(p, o)].payload:
                problems.append(f"fetch({p}, {o}) returned {got!r}, reading from the start gave another")
        return stored

    def _check_message(
        self,
        m: Message,
        p: int,
        origins: dict[tuple[int, int, int], tuple[int, int]],
        problems: list[str],
    ) -> None:
        assert m.offset is not None
        fields = (m.subject, m.payload, m.key, m.headers, m.id if m.has_explicit_id else None)
        known = self.valid.get((p, m.offset))
        if known is not None and known[0] == fields:
            where = known[1]  # identical to what an earlier check validated
        else:
            parsed = parse_payload(m.payload)
            if parsed is None:
                problems.append(
                    f"partition {p} offset {m.offset}: payload {m.payload[:40]!r} was never published"
                )
                return
            where = parsed
            spec = message_spec(self.seed, *where)
            if fields != (spec.subject, spec.payload, spec.key, spec.headers, spec.msg_id):
                problems.append(f"partition {p} offset {m.offset}: message {where} is altered: {m!r}")
                return
            keyed = spec.key is not None and TASK_KINDS[where[1]] != "many"
            if keyed and partition_for_key(spec.key.encode(), PARTITIONS) != p:  # type: ignore[union-attr]
                problems.append(f"message {where} with key {spec.key!r} stored in partition {p}")
            self.valid[(p, m.offset)] = (fields, where)
        if where in origins:
            problems.append(f"message {where} stored twice: at {origins[where]} and {(p, m.offset)}")
        origins[where] = (p, m.offset)


class _TornTailCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "torn tail" in record.getMessage():
            self.count += 1


if __name__ == "__main__":
    writer_main()
