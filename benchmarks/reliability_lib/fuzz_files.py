"""Damaged data files: flip bytes in, cut, or append junk to segments, indexes and checkpoints
of a cleanly closed folder, then open it and read everything back.

Acceptable outcomes: the damage is detected (`CorruptLogError` on open or read, after which
`pigeon.engine.repair` must bring the folder back to a state that serves only original
messages), or it is harmless (everything served, identical), or the newest segment of a
partition lost its tail (the documented torn-tail recovery; what is served is identical).
Anything else is a failure: another exception, a message served that differs from what was
written at its offset, or messages missing from the middle without an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import shutil
from pathlib import Path

from pigeon.engine import Engine, StreamConfig
from pigeon.engine.repair import repair
from pigeon.errors import CorruptLogError

from .common import Report, payload_for

STREAM = "files"
PARTITIONS = 2
Original = dict[tuple[int, int], tuple[str, bytes]]


async def _build(folder: Path, messages: int) -> Original:
    written: Original = {}
    config = StreamConfig(STREAM, ("files.>",), partitions=PARTITIONS, segment_bytes=4096)
    async with await Engine.open(folder) as engine:
        await engine.create_stream(config)
        for i in range(messages):
            msg_id = f"m-{i}"
            ack = await engine.publish(f"files.{i % 3}", payload_for(msg_id), key=f"k{i % 7}", msg_id=msg_id)
            written[(ack.partition, ack.offset)] = (msg_id, payload_for(msg_id))
    return written


async def _served(folder: Path) -> dict[tuple[int, int], tuple[str, bytes]]:
    served = {}
    async with await Engine.open(folder) as engine:
        for p in range(PARTITIONS):
            async for m in engine.read(STREAM, p):
                served[(p, m.offset)] = (m.id, m.payload)
    return served


def _damage(rng: random.Random, folder: Path) -> tuple[Path, str]:
    files = sorted(
        f
        for f in (folder / "streams" / STREAM).rglob("*")
        if f.is_file() and f.suffix in (".log", ".index", ".json")
    )
    target = rng.choice([f for f in files if f.name != "stream.json"])
    data = bytearray(target.read_bytes())
    action = rng.choice(["flip", "flip", "truncate", "zero", "append"]) if data else "append"
    where = rng.randrange(len(data)) if data else 0
    if action == "flip":
        data[where] ^= 1 << rng.randrange(8)
    elif action == "truncate":
        del data[where:]
    elif action == "zero":
        data[where : where + rng.randint(1, 64)] = bytes(len(data[where : where + 64]))
    else:
        data += rng.randbytes(rng.randint(1, 64))
    target.write_bytes(bytes(data))
    return target, f"{action} at {where} of {target.relative_to(folder)}"


def _newest_segment(target: Path) -> bool:
    return target.suffix == ".log" and target == max(target.parent.glob("*.log"))


def _compare(original: Original, served: Original, missing_ok: str) -> str | None:
    """None when ``served`` is acceptable: identical messages only, and missing ones only as
    ``missing_ok`` allows ("none", "tail" of a partition, or "any" after a repair)."""
    for where, message in served.items():
        if original.get(where) != message:
            return f"served {message[0]!r} at {where}, written {original.get(where, ('nothing',))[0]!r}"
    missing = sorted(set(original) - set(served))
    if not missing or missing_ok == "any":
        return None
    if missing_ok == "none":
        return f"{len(missing)} messages silently missing, first {missing[0]}"
    for p, o in missing:
        if any(q == p and n > o for q, n in served):
            return f"message {(p, o)} missing before served ones"
    return None


async def _trial(rng: random.Random, pristine: Path, trial: Path, original: Original, report: Report) -> str:
    shutil.copytree(pristine, trial)
    target, what = _damage(rng, trial)
    try:
        problem = _compare(original, await _served(trial), "tail" if _newest_segment(target) else "none")
        outcome = "harmless"
    except CorruptLogError:
        outcome = await _after_repair(trial, original, what, report)
        problem = None if outcome != "failed" else "served damaged data after repair"
    except Exception as error:
        problem, outcome = f"{type(error).__name__}: {error}", "crashed"
    if problem:
        report.fail(f"damaged file: {what}: {problem}")
        outcome = "failed"
    shutil.rmtree(trial)
    return outcome


async def _after_repair(trial: Path, original: Original, what: str, report: Report) -> str:
    """Detected: `repair` must leave a folder that serves nothing but original messages."""
    with contextlib.redirect_stdout(io.StringIO()):
        repair(trial)
    try:
        served = await _served(trial)
    except CorruptLogError as error:
        report.note(f"detected, but still unreadable after repair: {what}: {error}")
        return "detected_not_repaired"
    return "failed" if _compare(original, served, "any") else "detected_repaired"


def run(work: Path, trials: int, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    pristine = work / "pristine"
    original = asyncio.run(_build(pristine, 400))
    outcomes: dict[str, int] = {}
    for i in range(trials):
        outcome = asyncio.run(_trial(rng, pristine, work / f"trial-{i}", original, report))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    report.figures["file_damage_trials"] = trials
    report.figures["file_damage_outcomes"] = outcomes
