"""Durability of the storage engine: crashes, torn tails and flipped bits.

* ``test_sigkill_*``: writer processes (``tests/crash_writer.py``) publish from concurrent
  tasks and are SIGKILLed at random moments, over and over on one data folder; after every
  kill each acknowledged publish must be stored at its acknowledged partition and offset,
  offsets dense, nothing corrupt, nothing altered. ``PIGEON_CRASH_CYCLES`` (default 30) sets
  the number of kills with durability 'always' (half as many with 'interval'),
  ``PIGEON_CRASH_SEED`` the seed (printed with every failure). ``benchmarks/crash_campaign.py``
  runs the same loop for longer.
* ``test_truncation_*``: a log cut at every byte length of its last segment reopens as
  exactly a prefix of what was written (whole batches), and publishing continues at the next
  offset, with or without ``state.json``.
* ``test_bitflip_*``: a flipped bit in an acknowledged batch is reported as `CorruptLogError`
  naming the file and the batch's byte position, never read back as altered data; in the last
  batch of the active segment after a crash (no ``state.json``) it is the unacknowledged torn
  tail and is dropped.

The truncation and bit-flip tests run in this process with ``os.fsync`` made a no-op: they
exercise recovery logic on files, not the disk (the crash tests keep real fsyncs).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.engine import Engine, StreamConfig
from pigeon.errors import CorruptLogError
from pigeon.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_writer import CrashCampaign

CRASH_CYCLES = int(os.environ.get("PIGEON_CRASH_CYCLES", "30"))
CRASH_SEED = int(os.environ.get("PIGEON_CRASH_SEED", "20250611"))

# The batch layout documented in records.py: magic u8 | attributes u8 | length u32 | crc32c u32 |
# base_offset u64 | count u32 | timestamp_ns i64 | base_id u128.
HEADER_SIZE = 46
ATTRIBUTES_AT = 1
_PREFIX = struct.Struct("<BBI")
_BASE_AND_COUNT = struct.Struct("<QI")


# == 1. SIGKILL crash loops ===================================================================


def _run_crash_campaign(tmp_path: Path, durability: str, cycles: int) -> None:
    log: list[str] = []
    campaign = CrashCampaign(
        tmp_path, seed=CRASH_SEED, durability=durability, max_delay_s=0.25, log=log.append
    )
    for _ in range(cycles):
        report = campaign.run_cycle()
        if report.problems:
            pytest.fail(
                f"{durability}: after kill {report.cycle} (seed {CRASH_SEED}; reproduce with "
                f"PIGEON_CRASH_SEED={CRASH_SEED} PIGEON_CRASH_CYCLES={report.cycle + 1}; "
                f"folder {campaign.data}): lost {report.lost}, corrupt {report.corrupt}\n"
                + "\n".join(report.problems[:30])
                + "\n-- history --\n"
                + "\n".join(log[-10:])
            )
    assert campaign.acked, f"seed {CRASH_SEED}: no publish was ever acknowledged\n" + "\n".join(log)
    if cycles >= 5:
        segments = [len(list((campaign.data / "streams/crash" / f"p{p}").glob("*.log"))) for p in (0, 1)]
        assert min(segments) >= 3, f"seed {CRASH_SEED}: segments never rolled ({segments})"


@pytest.mark.slow
def test_sigkill_durability_always_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    _run_crash_campaign(tmp_path, "always", CRASH_CYCLES)


@pytest.mark.slow
def test_sigkill_durability_interval_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    # A SIGKILL is a process crash, not a power loss: an acknowledged write already reached
    # the OS, so it survives even though its fsync had not happened yet.
    _run_crash_campaign(tmp_path, "interval", max(1, CRASH_CYCLES // 2))


# == shared fixtures for truncation and bit flips ===============================================

STREAM = "t"
LOG_DIR = Path("streams") / STREAM / "p0"
Fields = tuple[str, bytes, str | None, dict[str, str], str | None]


def fields(m: Message) -> Fields:
    return (m.subject, m.payload, m.key, m.headers, m.id if m.has_explicit_id else None)


@dataclass(frozen=True)
class Batch:
    start: int
    end: int
    count: int


def parse_batches(data: bytes) -> list[Batch]:
    """Batch boundaries from the documented layout (independent of the engine's reader)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, _attributes, length = _PREFIX.unpack_from(data, pos)
        assert magic == 0xB1 and length >= HEADER_SIZE, (pos, magic, length)
        _base, count = _BASE_AND_COUNT.unpack_from(data, pos + 10)
        out.append(Batch(pos, pos + length, count))
        pos += length
    assert pos == len(data)
    return out


Snapshot = dict[str, bytes]


def take_snapshot(root: Path) -> Snapshot:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


def materialize(snapshot: Snapshot, root: Path, changes: dict[str, bytes | None] | None = None) -> None:
    """Make ``root`` hold exactly ``snapshot`` with ``changes`` (None deletes a file)."""
    files = dict(snapshot)
    for name, data in (changes or {}).items():
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data
    if root.exists():
        for p in root.rglob("*"):
            if p.is_file() and p.name != "LOCK" and str(p.relative_to(root)) not in files:
                p.unlink()
    for name, data in files.items():
        path = root / name
        try:
            if path.read_bytes() == data:
                continue  # reading is cheaper than rewriting: most files are untouched
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@dataclass
class Built:
    written: list[Fields]  # every message, in offset order (one partition)
    rolled: Snapshot  # engine still running; state.json written by the last segment roll
    closed: Snapshot  # after a clean close: state.json at the end of the active segment
    resumed: Snapshot  # reopened after `closed`, more batches in the same segment, no close
    closed_count: int  # messages in `rolled` and `closed`
    last_log: str  # the active segment's file name (relative)


def _config() -> StreamConfig:
    return StreamConfig(STREAM, ("t.>",), partitions=1, durability="always", segment_bytes=4096)


async def _publish_op(engine: Engine, rnd: random.Random, written: list[Fields], small: bool) -> None:
    def spec(kind: str) -> tuple[str, bytes, str | None, dict[str, str], str | None]:
        n = len(written) + len(pending)
        payload = f"{n}:".encode() + rnd.randbytes(rnd.choice([0, 3, rnd.randrange(1, 60 if small else 300)]))
        if kind == "many":
            return ("t.many", payload, None, {}, None)
        key = f"k{rnd.randrange(5)}" if rnd.random() < 0.5 else None
        headers = {"h": str(n), "trace": rnd.randbytes(3).hex()} if rnd.random() < 0.4 else {}
        msg_id = f"id-{n}" if rnd.random() < 0.4 else None
        return (f"t.{kind}", payload, key, headers, msg_id)

    pending: list[Fields] = []
    kind = rnd.choice(["one", "one", "batch", "many"])
    if kind == "one":
        s = spec(kind)
        pending.append(s)
        ack = await engine.publish(s[0], s[1], key=s[2], headers=s[3] or None, msg_id=s[4])
        assert ack.offset == len(written) and not ack.duplicate
    elif kind == "batch":
        for _ in range(rnd.randint(2, 3 if small else 5)):
            pending.append(spec(kind))
        acks = await engine.publish_batch(
            [Message(s[0], s[1], key=s[2], headers=s[3], id=s[4]) for s in pending]
        )
        assert [a.offset for a in acks] == list(range(len(written), len(written) + len(pending)))
    else:
        for _ in range(rnd.randint(2, 3 if small else 6)):
            pending.append(spec(kind))
        acks = await engine.publish_many("t.many", [s[1] for s in pending])
        assert [a.offset for a in acks] == list(range(len(written), len(written) + len(pending)))
    written += pending


def _logs(root: Path) -> list[Path]:
    return sorted((root / LOG_DIR).glob("*.log"))


async def _build(root: Path, seed: int) -> Built:
    rnd = random.Random(seed)
    written: list[Fields] = []
    engine = await Engine.open(root)
    await engine.create_stream(_config())
    # Roll a few segments, then stop with at least 5 (smaller) batches and room for more in the
    # last one: the truncation tests try every byte length of its last batches.
    logs = _logs(root)
    while True:
        await _publish_op(engine, rnd, written, small=len(logs) >= 4)
        logs = _logs(root)
        last = logs[-1].read_bytes()
        if len(logs) >= 4 and len(parse_batches(last)) >= 5 and len(last) <= 2400:
            break
    state = root / LOG_DIR / "state.json"
    for _ in range(200):  # the roll's checkpoint is written after its fsync, in the background
        if json.loads(state.read_bytes())["segment"] == int(logs[-1].name[:-4]):
            break
        await asyncio.sleep(0.01)
    checkpoint = json.loads(state.read_bytes())
    assert (checkpoint["segment"], checkpoint["position"]) == (int(logs[-1].name[:-4]), 0)
    rolled = take_snapshot(root)
    await engine.close()
    closed = take_snapshot(root)
    closed_count = len(written)
    checkpoint = json.loads(state.read_bytes())
    assert (checkpoint["segment"], checkpoint["position"]) == (int(logs[-1].name[:-4]), len(last))

    engine = await Engine.open(root)
    for _ in range(4):
        await _publish_op(engine, rnd, written, small=True)
    assert _logs(root) == logs, "the resumed batches must stay in the same segment"
    resumed = take_snapshot(root)
    await engine.close()
    return Built(written, rolled, closed, resumed, closed_count, str(logs[-1].relative_to(root)))


@pytest.fixture(scope="module")
def no_fsync() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, no_fsync: None) -> Built:
    return asyncio.run(_build(tmp_path_factory.mktemp("built") / "data", seed=7))


async def _read_all(engine: Engine, into: list[Fields] | None = None) -> list[Fields]:
    out: list[Fields] = [] if into is None else into
    async for m in engine.read(STREAM, 0):
        assert m.offset == len(out), f"offset {m.offset} at position {len(out)}: not dense"
        out.append(fields(m))
    return out


async def _check_continues(engine: Engine, expected: list[Fields], lost: list[Fields]) -> None:
    """After recovery to ``expected``: dedup knows the kept ids and forgot the lost ones, and a
    new publish takes the next offset."""
    kept_ids = [(i, f) for i, f in enumerate(expected) if f[4] is not None]
    if kept_ids:
        i, f = kept_ids[-1]
        ack = await engine.publish(f[0], f[1], key=f[2], headers=f[3] or None, msg_id=f[4])
        assert (ack.offset, ack.duplicate) == (i, True), "a kept message id was forgotten"
    lost_ids = [f for f in lost if f[4] is not None]
    new = lost_ids[0] if lost_ids else ("t.new", b"after recovery", None, {}, None)
    ack = await engine.publish(new[0], new[1], key=new[2], headers=new[3] or None, msg_id=new[4])
    assert (ack.offset, ack.duplicate) == (len(expected), False), (
        "the next publish must take the next offset (and a lost id must not count as a duplicate)"
    )
    assert [fields(m) for m in engine.fetch(STREAM, 0, len(expected), 10)] == [new]


# == 2. truncation at any byte =================================================================


def _truncation_lengths(batches: list[Batch], size: int, exhaustive_from: int) -> list[int]:
    """Every length from ``exhaustive_from`` on; before it each batch boundary and its header's
    edges, plus every third byte."""
    lengths = set(range(exhaustive_from, size + 1))
    for b in batches:
        for d in (0, 1, 2, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, b.end - b.start - 1):
            if b.start + d <= size:
                lengths.add(b.start + d)
    lengths.update(range(0, exhaustive_from, 3))
    return sorted(lengths)


def _kept_messages(batches: list[Batch], base: int, length: int) -> int:
    return base + sum(b.count for b in batches if b.end <= length)


@pytest.mark.parametrize(
    ("snapshot_name", "keep_state"),
    [("rolled", True), ("rolled", False), ("resumed", False)],
    ids=["after-roll-with-state", "after-roll-no-state", "after-reopen-no-state"],
)
async def test_truncation_at_every_byte_recovers_a_prefix(
    built: Built, tmp_path: Path, snapshot_name: str, keep_state: bool, loop_errors: list[dict[str, Any]]
) -> None:
    snapshot: Snapshot = getattr(built, snapshot_name)
    count = built.closed_count if snapshot_name == "rolled" else len(built.written)
    data = snapshot[built.last_log]
    batches = parse_batches(data)
    base = int(Path(built.last_log).name[:-4])
    assert base + sum(b.count for b in batches) == count
    # Exhaustive over the last three batches (the torn tails a crash can leave), dense before.
    lengths = _truncation_lengths(batches, len(data), batches[-3].start)
    root = tmp_path / "data"
    state_name = str(LOG_DIR / "state.json")
    for length in lengths:
        changes: dict[str, bytes | None] = {built.last_log: data[:length]}
        if not keep_state:
            changes[state_name] = None
        materialize(snapshot, root, changes)
        kept = _kept_messages(batches, base, length)
        expected, lost = built.written[:kept], built.written[kept:count]
        engine = await Engine.open(root)
        try:
            got = await _read_all(engine)
            assert got == expected, f"truncated to {length} bytes: not the prefix of {kept} messages"
            await _check_continues(engine, expected, lost)
        finally:
            await engine.close()
        if length in (0, len(data)) or length % 7 == 0 or any(b.end == length for b in batches):
            engine = await Engine.open(root)  # and that recovery itself was made durable
            try:
                assert (await _read_all(engine))[:kept] == expected
            finally:
                await engine.close()
    assert not loop_errors, f"background task errors: {loop_errors}"


async def test_truncation_below_a_clean_checkpoint_is_reported(built: Built, tmp_path: Path) -> None:
    """``state.json`` (written at a clean close) vouches for bytes that are gone: that is not a
    torn tail but lost fsynced data, and the engine must say so instead of guessing."""
    data = built.resumed[built.last_log]
    checkpoint = json.loads(built.resumed[str(LOG_DIR / "state.json")])
    position = checkpoint["position"]
    assert 0 < position < len(data)
    batches = parse_batches(data)
    base = int(Path(built.last_log).name[:-4])
    root = tmp_path / "data"
    for length in _truncation_lengths(batches, len(data), exhaustive_from=position - HEADER_SIZE):
        materialize(built.resumed, root, {built.last_log: data[:length]})
        if length < position:
            with pytest.raises(CorruptLogError) as info:
                await Engine.open(root)
            assert info.value.path == str(root / built.last_log)
            assert info.value.position == length
            assert built.last_log.split("/")[-1] in str(info.value)
            continue
        kept = _kept_messages(batches, base, length)
        engine = await Engine.open(root)
        try:
            assert await _read_all(engine) == built.written[:kept], f"truncated to {length}"
            await _check_continues(engine, built.written[:kept], built.written[kept:])
        finally:
            await engine.close()


# == 3. bit flips ================================================================================


@dataclass(frozen=True)
class Located:
    log: str  # relative path of the segment file
    batch: Batch
    index: int  # of the batch in its file
    first_offset: int  # offset of the batch's first message


def _locate(snapshot: Snapshot, log: str, position: int) -> Located:
    batches = parse_batches(snapshot[log])
    offset = int(Path(log).name[:-4])
    for i, b in enumerate(batches):
        if b.start <= position < b.end:
            return Located(log, b, i, offset)
        offset += b.count
    raise AssertionError(f"{position} is not inside {log}")


def _segment_logs(snapshot: Snapshot) -> list[str]:
    return sorted(name for name in snapshot if name.endswith(".log"))


async def _check_flip(
    built: Built, root: Path, log: str, position: int, bit: int, keep_state: bool
) -> tuple[str, Any]:
    """Flip one bit of the clean-closed folder and check the outcome exactly.

    Returns ("corrupt", error) or ("truncated", messages kept).
    """
    snapshot = built.closed
    data = bytearray(snapshot[log])
    data[position] ^= 1 << bit
    changes: dict[str, bytes | None] = {log: bytes(data)}
    if not keep_state:
        changes[str(LOG_DIR / "state.json")] = None
    materialize(snapshot, root, changes)
    where = _locate(snapshot, log, position)
    logs = _segment_logs(snapshot)
    is_torn_tail = (
        not keep_state
        and log == logs[-1]
        and where.index == len(parse_batches(snapshot[log])) - 1
    )
    written = built.written[: built.closed_count]
    context = f"bit {bit} of byte {position} ({position - where.batch.start} into its batch) of {log}"
    read: list[Fields] = []
    error: CorruptLogError | None = None
    try:
        engine = await Engine.open(root)
    except CorruptLogError as exc:
        error = exc
    else:
        try:
            try:
                await _read_all(engine, read)
            except CorruptLogError as exc:
                error = exc
            # Whatever was returned, before an error or not, is exactly what was written.
            assert read == written[: len(read)], f"{context}: altered data returned"
            if is_torn_tail and error is None:
                assert read == written[: where.first_offset], f"{context}: torn tail not dropped"
                await _check_continues(engine, read, written[where.first_offset :])
        finally:
            await engine.close()
    if is_torn_tail:
        assert error is None, f"{context}: the unacknowledged tail raised {error!r}"
        return "truncated", len(read)
    assert error is not None, f"{context}: the flip went unnoticed"
    assert (error.path, error.position) == (str(root / log), where.batch.start), (
        f"{context}: {error!r} names {error.path} at {error.position}, expected the batch at "
        f"{where.batch.start}"
    )
    assert Path(log).name in str(error) and f"byte {where.batch.start}" in str(error)
    return "corrupt", error


@pytest.mark.parametrize("keep_state", [True, False], ids=["with-state", "no-state"])
async def test_bitflip_in_sealed_segments_is_detected(built: Built, tmp_path: Path, keep_state: bool) -> None:
    rnd = random.Random(11 + keep_state)
    logs = _segment_logs(built.closed)
    assert len(logs) >= 4
    for log in logs[:-1]:
        for batch in parse_batches(built.closed[log]):
            for _ in range(2):  # two random bits of every stored batch
                position = rnd.randrange(batch.start, batch.end)
                outcome, _ = await _check_flip(
                    built, tmp_path / "data", log, position, rnd.randrange(8), keep_state
                )
                assert outcome == "corrupt"


@pytest.mark.parametrize("keep_state", [True, False], ids=["with-state", "no-state"])
async def test_bitflip_mid_active_segment_is_detected(built: Built, tmp_path: Path, keep_state: bool) -> None:
    rnd = random.Random(23 + keep_state)
    log = _segment_logs(built.closed)[-1]
    batches = parse_batches(built.closed[log])
    # Every batch but the last is followed by valid batches: damage there is never a torn tail.
    for batch in batches[:-1]:
        for _ in range(6):
            position = rnd.randrange(batch.start, batch.end)
            outcome, _ = await _check_flip(
                built, tmp_path / "data", log, position, rnd.randrange(8), keep_state
            )
            assert outcome == "corrupt"


async def test_bitflip_every_header_bit_of_a_stored_batch_is_detected(built: Built, tmp_path: Path) -> None:
    log = _segment_logs(built.closed)[1]
    batch = parse_batches(built.closed[log])[1]
    for position in range(batch.start, batch.start + HEADER_SIZE):
        for bit in range(8):
            outcome, _ = await _check_flip(built, tmp_path / "data", log, position, bit, keep_state=True)
            assert outcome == "corrupt"


async def test_bitflip_in_last_batch_after_crash_is_dropped_as_torn_tail(
    built: Built, tmp_path: Path
) -> None:
    """No state.json (a crash) and damage in the last batch of the active segment: that batch
    was never acknowledged (a crash tore it), so recovery drops it and keeps the rest."""
    rnd = random.Random(31)
    log = _segment_logs(built.closed)[-1]
    last = parse_batches(built.closed[log])[-1]
    for position in range(last.start, last.end):  # every byte, a random bit of each
        outcome, kept = await _check_flip(
            built, tmp_path / "data", log, position, rnd.randrange(8), keep_state=False
        )
        assert outcome == "truncated"
        assert kept == _locate(built.closed, log, position).first_offset


@pytest.mark.parametrize("bit", range(8))
async def test_bitflip_in_attributes_byte_is_detected(built: Built, tmp_path: Path, bit: int) -> None:
    """Regression: the attributes byte sits before the CRC field; it was once left outside the
    CRC, so a flip went unnoticed and bit 0 (UNIFORM) made the reader return key and header
    bytes as the payload."""
    logs = _segment_logs(built.closed)
    for log in (logs[0], logs[-1]):
        for batch in parse_batches(built.closed[log])[:-1]:
            outcome, _ = await _check_flip(
                built, tmp_path / "data", log, batch.start + ATTRIBUTES_AT, bit, keep_state=True
            )
            assert outcome == "corrupt"


@st.composite
def _flips(draw: st.DrawFn, snapshot: Snapshot) -> tuple[str, int, int, bool]:
    logs = _segment_logs(snapshot)
    log = draw(st.sampled_from(logs))
    position = draw(st.integers(0, len(snapshot[log]) - 1))
    return log, position, draw(st.integers(0, 7)), draw(st.booleans())


def test_bitflip_anywhere_never_returns_altered_data(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("flips") / "data"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_flips(built.closed))
    def check(flip: tuple[str, int, int, bool]) -> None:
        log, position, bit, keep_state = flip
        asyncio.run(_check_flip(built, root, log, position, bit, keep_state))

    check()
