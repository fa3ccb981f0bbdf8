"""The repair command: salvage every intact batch of a segment damaged in the middle."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pigeon.engine import Engine, StartAt, StreamConfig
from pigeon.engine.records import HEADER_SIZE, BatchHeader
from pigeon.errors import CorruptLogError
from pigeon.message import Message

STREAM = "orders"
PER_BATCH = 3


def run_repair(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.engine.repair", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def payload(offset: int) -> bytes:
    return f"message {offset:05d} ".encode() * 4


async def build(path: Path, batches: int = 40) -> None:
    """One partition, small segments, ``batches`` batches of PER_BATCH messages each."""
    engine = await Engine.open(path)
    await engine.create_stream(StreamConfig(STREAM, ("orders.>",), segment_bytes=2048))
    for b in range(batches):
        first = b * PER_BATCH
        await engine.publish_batch(
            [Message("orders.created", payload(first + i)) for i in range(PER_BATCH)]
        )
    await engine.close()


def partition_dir(path: Path) -> Path:
    return path / "streams" / STREAM / "p0"


def segment_files(path: Path) -> list[Path]:
    return sorted(partition_dir(path).glob("*.log"))


def batches_of(log: Path) -> list[tuple[int, BatchHeader]]:
    data = log.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = BatchHeader(data, pos)
        out.append((pos, header))
        pos += header.length
    return out


def damage(log: Path, position: int, how: str) -> None:
    data = bytearray(log.read_bytes())
    if how == "payload":
        data[position + HEADER_SIZE + 20] ^= 0xFF
    elif how == "magic":
        data[position] = 0
    elif how == "length":  # a length that runs over the following batches
        data[position + 2 : position + 6] = (10_000).to_bytes(4, "little")
    log.write_bytes(bytes(data))


def snapshot(path: Path) -> dict[str, bytes]:
    # LOCK names the last owner (the repair too), so it is not part of the data.
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


async def read_all(path: Path) -> list[tuple[int, bytes]]:
    engine = await Engine.open(path)
    try:
        return [(m.offset or 0, m.payload) async for m in engine.read(STREAM, 0)]
    finally:
        await engine.close()


# (which segment, which batch in it, how it is damaged)
CASES = [
    pytest.param(0, 3, "payload", id="sealed-middle-payload"),
    pytest.param(1, 2, "magic", id="sealed-middle-magic"),
    pytest.param(1, 2, "length", id="sealed-middle-length"),
    pytest.param(1, 0, "payload", id="sealed-first-batch"),
    pytest.param(0, -1, "payload", id="sealed-last-batch"),
    pytest.param(-1, 1, "payload", id="active-middle"),
    pytest.param(-1, -1, "payload", id="active-last-batch"),
]


@pytest.mark.parametrize(("segment", "batch", "how"), CASES)
async def test_repair_salvages_every_intact_batch(
    tmp_path: Path, segment: int, batch: int, how: str
) -> None:
    await build(tmp_path)
    everything = await read_all(tmp_path)
    next_offset = everything[-1][0] + 1
    logs = segment_files(tmp_path)
    assert len(logs) >= 3
    log = logs[segment]
    position, header = batches_of(log)[batch]
    assert len(batches_of(log)) >= 3
    lost = set(range(header.base_offset, header.next_offset))
    damage(log, position, how)
    damaged_bytes = log.read_bytes()

    with pytest.raises(CorruptLogError, match=r"pigeon\.engine\.repair"):
        await read_all(tmp_path)

    result = run_repair(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"lost offsets {min(lost)}" in result.stdout

    assert await read_all(tmp_path) == [(o, p) for o, p in everything if o not in lost]
    backups = list(partition_dir(tmp_path).glob(f"{log.name}.corrupt-*"))
    assert [b.read_bytes() for b in backups] == [damaged_bytes]

    engine = await Engine.open(tmp_path)
    try:
        ack = await engine.publish("orders.created", b"after repair")
        assert ack.offset == next_offset  # never reuses an offset that was handed out
    finally:
        await engine.close()
    again = run_repair(tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout


async def test_batches_after_a_gap_move_to_their_own_segment(tmp_path: Path) -> None:
    await build(tmp_path)
    log = segment_files(tmp_path)[0]
    batches = batches_of(log)
    position, header = batches[2]
    damage(log, position, "payload")

    result = run_repair(tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    (report,) = summary["partitions"][0]["damaged"]
    assert summary["damaged"] == 1 and not summary["dry_run"]
    assert report["batches_kept"] == len(batches) - 1
    assert report["bytes_dropped"] == header.length
    assert report["lost_offsets"] == [[header.base_offset, header.next_offset - 1]]
    assert report["pieces"] == [log.name, f"{header.next_offset:020d}.log"]
    assert (partition_dir(tmp_path) / f"{header.next_offset:020d}.log").exists()
    assert not (partition_dir(tmp_path) / "state.json").exists()


async def test_several_damaged_batches_across_segments(tmp_path: Path) -> None:
    await build(tmp_path)
    everything = await read_all(tmp_path)
    lost: set[int] = set()
    for log, picks in zip(segment_files(tmp_path), [(1, 4), (), (0, 2, -1)], strict=False):
        batches = batches_of(log)
        for pick in picks:
            position, header = batches[pick]
            damage(log, position, "payload")
            lost |= set(range(header.base_offset, header.next_offset))
    result = run_repair(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "repaired 2 of" in result.stdout
    assert await read_all(tmp_path) == [(o, p) for o, p in everything if o not in lost]


async def test_engine_rejects_a_gap_inside_a_segment(tmp_path: Path) -> None:
    # Why the repair splits segments: recovery requires contiguous offsets within one.
    await build(tmp_path)
    log = segment_files(tmp_path)[0]
    position, header = batches_of(log)[2]
    data = log.read_bytes()
    log.write_bytes(data[:position] + data[position + header.length :])
    (partition_dir(tmp_path) / "state.json").unlink()
    with pytest.raises(CorruptLogError, match="expected"):
        await read_all(tmp_path)


async def test_healthy_folder_is_left_alone(tmp_path: Path) -> None:
    await build(tmp_path)
    before = snapshot(tmp_path)
    result = run_repair(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "all intact, nothing to do" in result.stdout
    assert snapshot(tmp_path) == before


async def test_dry_run_reports_and_changes_nothing(tmp_path: Path) -> None:
    await build(tmp_path)
    log = segment_files(tmp_path)[1]
    position, header = batches_of(log)[1]
    damage(log, position, "payload")
    before = snapshot(tmp_path)
    result = run_repair(tmp_path, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and summary["damaged"] == 1
    (report,) = summary["partitions"][0]["damaged"]
    assert report["backup"] is None
    assert report["lost_offsets"] == [[header.base_offset, header.next_offset - 1]]
    assert snapshot(tmp_path) == before


async def test_stream_option_limits_the_repair(tmp_path: Path) -> None:
    await build(tmp_path)
    engine = await Engine.open(tmp_path)
    await engine.create_stream(StreamConfig("audit", ("audit.>",)))
    await engine.close()
    log = segment_files(tmp_path)[0]
    damage(log, batches_of(log)[1][0], "payload")
    before = snapshot(tmp_path)
    result = run_repair(tmp_path, "--stream", "audit")
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert snapshot(tmp_path) == before
    missing = run_repair(tmp_path, "--stream", "nope")
    assert missing.returncode == 2 and "no stream named 'nope'" in missing.stderr


async def test_refuses_while_an_engine_owns_the_folder(tmp_path: Path) -> None:
    await build(tmp_path)
    log = segment_files(tmp_path)[0]
    damage(log, batches_of(log)[1][0], "payload")
    before = snapshot(tmp_path)
    engine = await Engine.open(tmp_path)  # this process; the repair runs in another one
    try:
        result = await asyncio.to_thread(run_repair, tmp_path)
    finally:
        await engine.close()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "in use by process" in result.stderr
    assert log.read_bytes() == before[str(log.relative_to(tmp_path))]
    assert list(partition_dir(tmp_path).glob("*.corrupt-*")) == []


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_user_errors_print_one_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "data"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("not a folder")
    result = run_repair(target)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(target) in result.stderr


async def test_an_older_segment_cut_short_is_detected_not_read_as_a_gap(tmp_path: Path) -> None:
    await build(tmp_path)
    older = segment_files(tmp_path)[1]  # sealed: below the active segment
    (last_position, _) = batches_of(older)[-1]
    os.truncate(older, last_position + 10)  # the last batch cut in the middle
    with pytest.raises(CorruptLogError, match="is damaged"):
        await Engine.open(tmp_path)
    assert run_repair(tmp_path).returncode == 0
    async with await Engine.open(tmp_path) as engine:  # repaired: what was whole is read back
        offsets = [m.offset async for m in engine.read(STREAM, 0)]
        assert offsets and offsets == sorted(offsets)


def _index_of(path: Path, segment: int) -> Path:
    return segment_files(path)[segment].with_suffix(".index")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _cut_last_entry(path: Path) -> None:
    index = _index_of(path, 1)
    index.write_bytes(index.read_bytes()[:-16])


def _append_junk(path: Path) -> None:
    index = _index_of(path, 0)
    index.write_bytes(index.read_bytes() + b"\x01\x02\x03")


def _cut_checkpoint(path: Path) -> None:
    (partition_dir(path) / "state.json").write_bytes(b'{"next_offset": 1')


def _shift_checkpoint(path: Path) -> None:
    state = partition_dir(path) / "state.json"
    data = json.loads(state.read_text())
    data["position"] += 7  # inside a batch
    state.write_text(json.dumps(data))


# Damage to what is derived from intact logs: the indexes and the partition checkpoint.
DERIVED = [
    pytest.param(lambda p: _flip(_index_of(p, 1), 5), id="sealed-index-position"),
    pytest.param(lambda p: _flip(_index_of(p, 1), 2), id="sealed-index-offset"),
    pytest.param(lambda p: _flip(_index_of(p, 0), 12), id="sealed-index-timestamp"),
    pytest.param(_cut_last_entry, id="sealed-index-short"),
    pytest.param(_append_junk, id="index-junk-appended"),
    pytest.param(_cut_checkpoint, id="checkpoint-cut"),
    pytest.param(_shift_checkpoint, id="checkpoint-between-batches"),
]


@pytest.mark.parametrize("spoil", DERIVED)
async def test_damaged_indexes_and_checkpoints_are_rebuilt_from_the_logs(tmp_path: Path, spoil) -> None:
    await build(tmp_path)
    expected = await read_all(tmp_path)
    logs = {p.name: p.read_bytes() for p in segment_files(tmp_path)}
    spoil(tmp_path)
    result = run_repair(tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["damaged"] == 0 and summary["rebuilt"] == 1, summary
    assert summary["partitions"][0]["stale"], "the reason is reported"
    assert {p.name: p.read_bytes() for p in segment_files(tmp_path)} == logs, "the logs are untouched"
    assert await read_all(tmp_path) == expected
    async with await Engine.open(tmp_path) as engine:  # the rebuilt indexes find offsets and times
        from_60 = [m async for m in engine.read(STREAM, 0, StartAt.offset(60))]
        assert from_60[0].offset == 60
        by_time = [m async for m in engine.read(STREAM, 0, StartAt.time(from_60[0].timestamp))]
        assert by_time[0].offset <= 60 and by_time[-1].offset == expected[-1][0]
    again = run_repair(tmp_path)
    assert "all intact, nothing to do" in again.stdout, again.stdout
