"""Retention: limits by count, bytes, age and per subject, under both discard policies.

Streams here use small segments so they roll often: retention removes whole segments only,
after each roll and every second in the background.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pigeon.engine import Engine, StartAt, StreamConfig
from pigeon.engine.murmur2 import partition_for_key
from pigeon.errors import StreamFullError
from pigeon.message import Message

SEG = 4096
HAS_PUBLISH_MANY = hasattr(Engine, "publish_many")


def cfg(name: str = "r", subjects: tuple[str, ...] = ("r.>",), **kw: Any) -> StreamConfig:
    kw.setdefault("segment_bytes", SEG)
    return StreamConfig(name, subjects, **kw)


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    e = await Engine.open(data_dir)
    yield e
    await e.close()


def payload(i: int, size: int = 100) -> bytes:
    head = b"%06d|" % i
    return head + b"." * max(0, size - len(head))


def log_files(data_dir: Path, stream: str = "r", partition: int = 0) -> list[str]:
    return sorted(p.name for p in (data_dir / "streams" / stream / f"p{partition}").glob("*.log"))


async def read_all(
    engine: Engine, stream: str, partition: int, start: StartAt | None = None
) -> list[Message]:
    return [m async for m in engine.read(stream, partition, start)]


def readable(engine: Engine, stream: str) -> dict[tuple[int, int], bytes]:
    out = {}
    for p in engine.stream_info(stream).partitions:
        for m in engine.fetch(stream, p.partition, 0, 10**7):
            assert m.offset is not None
            out[(p.partition, m.offset)] = m.payload
    return out


async def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())


# -- max_msgs / max_bytes, discard old -------------------------------------------------------


async def test_max_msgs_discard_old_keeps_the_newest(engine: Engine, data_dir: Path) -> None:
    limit = 50
    await engine.create_stream(cfg(max_msgs=limit))
    sent: list[bytes] = []
    for i in range(600):
        ack = await engine.publish("r.x", payload(i))
        assert ack.offset == i, "offsets keep counting through retention"
        sent.append(payload(i))
        info = engine.stream_info("r")
        p = info.partitions[0]
        msgs = engine.fetch("r", 0, 0, 10**6)
        keep = min(len(sent), limit)
        assert info.messages >= keep, f"never fewer than the limit (step {i})"
        assert [m.offset for m in msgs] == list(range(p.first_offset, i + 1))
        assert [m.payload for m in msgs[-keep:]] == sent[-keep:]
        assert len(msgs) == info.messages
    p = engine.stream_info("r").partitions[0]
    assert p.first_offset > 0, "old segments were removed"
    per_segment = SEG // len(payload(0))
    assert p.messages <= limit + 2 * per_segment, "whole segments beyond the limit were removed"
    earliest = await read_all(engine, "r", 0)
    assert earliest[0].offset == p.first_offset
    assert [m.offset for m in await read_all(engine, "r", 0, StartAt.offset(0))] == [
        m.offset for m in earliest
    ]
    assert engine.resolve("r", 0, StartAt.earliest()) == p.first_offset
    assert len(log_files(data_dir)) == p.segments
    assert log_files(data_dir)[0] == f"{p.first_offset:020d}.log"


async def test_max_bytes_discard_old_keeps_the_newest(engine: Engine, data_dir: Path) -> None:
    limit = 10_000
    await engine.create_stream(cfg(max_bytes=limit))
    await engine.publish("r.x", payload(0))
    batch_size = engine.stream_info("r").bytes  # every message here has the same size
    fit = limit // batch_size
    sent = [payload(0)]
    for i in range(1, 500):
        await engine.publish("r.x", payload(i))
        sent.append(payload(i))
        info = engine.stream_info("r")
        assert info.bytes >= min(len(sent) * batch_size, limit), f"step {i}"
        msgs = engine.fetch("r", 0, 0, 10**6)
        keep = min(len(sent), fit)
        assert [m.payload for m in msgs[-keep:]] == sent[-keep:]
    info = engine.stream_info("r")
    assert info.partitions[0].first_offset > 0
    assert info.bytes <= limit + 2 * SEG
    assert len(log_files(data_dir)) == info.partitions[0].segments
    assert log_files(data_dir)[0] == f"{info.partitions[0].first_offset:020d}.log", "whole segments"


async def test_max_msgs_counts_the_whole_stream(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3, max_msgs=60))
    for i in range(900):
        await engine.publish("r.x", payload(i), key=f"k{i % 5}")
    info = engine.stream_info("r")
    assert info.messages >= 60
    assert sum(p.first_offset for p in info.partitions) > 0
    # Whole-stream limit: well under what the three partitions would keep with 60 each.
    assert info.messages < 3 * 60 + 3 * (SEG // 100)


async def test_max_msgs_keeps_the_newest_messages_across_partitions_minimal(engine: Engine) -> None:
    # Two partitions, limit 2, segments of two ~460-byte batches: publish to B, then A, A, A.
    await engine.create_stream(cfg(partitions=2, segment_bytes=1024, max_msgs=2))
    home = partition_for_key(b"a", 2)
    other = next(k for k in "bcdefgh" if partition_for_key(k.encode(), 2) != home)
    acks = [await engine.publish("r.x", payload(i, 400), key=k) for i, k in enumerate([other, "a", "a", "a"])]
    have = readable(engine, "r")
    assert have.get((acks[2].partition, acks[2].offset)) == payload(2, 400), f"kept {sorted(have)}"
    assert have.get((acks[3].partition, acks[3].offset)) == payload(3, 400)


async def test_max_msgs_keeps_the_newest_messages_across_partitions(engine: Engine) -> None:
    limit = 20
    await engine.create_stream(cfg(partitions=3, segment_bytes=1024, max_msgs=limit))
    sent: list[tuple[int, int, bytes]] = []
    for i in range(300):
        ack = await engine.publish("r.x", payload(i, 45))
        sent.append((ack.partition, ack.offset, payload(i, 45)))
        have = readable(engine, "r")
        missing = [s for s in sent[-limit:] if have.get((s[0], s[1])) != s[2]]
        assert missing == [], f"step {i}: newest messages lost: {missing}"


# -- discard new -----------------------------------------------------------------------------


async def test_discard_new_max_msgs_refuses_and_writes_nothing(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3, max_msgs=10, discard="new"))
    for i in range(9):
        await engine.publish("r.x", payload(i), key=f"k{i}")
    before = readable(engine, "r")
    with pytest.raises(StreamFullError) as info:
        await engine.publish_batch([Message("r.x", b"a"), Message("r.x", b"b")])
    assert "'r'" in str(info.value) and "10" in str(info.value)
    assert readable(engine, "r") == before, "a batch that does not fit is refused whole"
    await engine.publish("r.x", payload(9))
    for i in range(3):
        with pytest.raises(StreamFullError):
            await engine.publish("r.x", b"more", key=f"other{i}")
    if HAS_PUBLISH_MANY:
        with pytest.raises(StreamFullError):
            await engine.publish_many("r.x", [b"1"])
    assert engine.stream_info("r").messages == 10
    assert len(readable(engine, "r")) == 10
    # Making room (here: purging) lets publishes through again.
    await engine.purge_stream("r")
    assert (await engine.publish("r.x", b"again")).duplicate is False


async def test_discard_new_max_bytes_refuses_and_writes_nothing(engine: Engine) -> None:
    await engine.create_stream(cfg("probe", ("pppp.>",)))
    await engine.publish("pppp.x", payload(0))
    batch_size = engine.stream_info("probe").bytes
    limit = 5 * batch_size + batch_size // 2
    await engine.create_stream(cfg("full", ("ffff.>",), max_bytes=limit, discard="new"))
    for i in range(5):
        await engine.publish("ffff.x", payload(i))
    assert engine.stream_info("full").bytes == 5 * batch_size
    before = readable(engine, "full")
    with pytest.raises(StreamFullError) as info:
        await engine.publish("ffff.x", payload(5))
    assert "bytes" in str(info.value)
    with pytest.raises(StreamFullError):
        await engine.publish_batch([Message("ffff.x", payload(5))])
    assert readable(engine, "full") == before
    assert engine.stream_info("full").bytes == 5 * batch_size


async def test_discard_new_single_publishes_racing_for_the_last_slots(engine: Engine) -> None:
    await engine.create_stream(cfg(max_msgs=3, discard="new", durability="always"))
    results = await asyncio.gather(
        *(engine.publish("r.x", b"%d" % i) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, StreamFullError) for r in results if isinstance(r, BaseException))
    assert engine.stream_info("r").messages == 3


async def test_discard_new_batches_racing_for_the_last_slots(engine: Engine) -> None:
    await engine.create_stream(cfg(max_msgs=3, discard="new", durability="never"))
    results = await asyncio.gather(
        *(engine.publish_batch([Message("r.x", b"%d" % i)]) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert engine.stream_info("r").messages == 3


# -- max_age_s -------------------------------------------------------------------------------


async def test_max_age_removes_old_segments_and_the_idle_active_one(
    engine: Engine, data_dir: Path
) -> None:
    await engine.create_stream(cfg(max_age_s=0.5))
    for i in range(100):
        await engine.publish("r.x", payload(i))
    assert engine.stream_info("r").partitions[0].segments > 2
    # The background pass (every second) removes the sealed segments, then rolls and removes
    # the active one once its newest message is older than max_age_s.
    assert await wait_until(lambda: engine.stream_info("r").messages == 0, timeout=4)
    p = engine.stream_info("r").partitions[0]
    assert (p.first_offset, p.next_offset, p.messages) == (100, 100, 0)
    assert engine.fetch("r", 0, 0) == []
    assert engine.last_message("r", "r.x") is None
    assert len(log_files(data_dir)) == 1, "only the fresh, empty active segment is left"

    ack = await engine.publish("r.x", b"fresh")
    assert ack.offset == 100, "the stream keeps accepting, offsets continue"
    assert [(m.offset, m.payload) for m in await read_all(engine, "r", 0)] == [(100, b"fresh")]
    await asyncio.sleep(0.2)
    assert [m.payload for m in await read_all(engine, "r", 0)] == [b"fresh"], "young data stays"
    assert await wait_until(lambda: engine.stream_info("r").messages == 0, timeout=4)
    assert (await engine.publish("r.x", b"later")).offset == 101


async def test_max_age_removes_aged_segments_at_a_roll(data_dir: Path) -> None:
    # No background pass during the test: only the roll triggers retention.
    engine = await Engine.open(data_dir, retention_interval_s=3600)
    try:
        await engine.create_stream(cfg(max_age_s=0.4))
        for i in range(100):
            await engine.publish("r.x", payload(i))
        assert engine.stream_info("r").partitions[0].segments > 2
        active_base = int(log_files(data_dir)[-1][:-4])
        assert active_base > 0
        await asyncio.sleep(0.6)
        assert engine.stream_info("r").messages == 100, "nothing happens without a roll"
        i = 100
        while engine.stream_info("r").partitions[0].first_offset == 0:
            await engine.publish("r.x", payload(i))
            i += 1
            assert i < 200, "the roll did not remove the aged segments"
        # Every sealed segment that aged out went; the one that also holds new messages stays.
        assert engine.stream_info("r").partitions[0].first_offset == active_base
        msgs = await read_all(engine, "r", 0)
        assert [m.offset for m in msgs] == list(range(active_base, i))
        assert [m.payload for m in msgs] == [payload(n) for n in range(active_base, i)]
        assert log_files(data_dir)[0] == f"{active_base:020d}.log"
    finally:
        await engine.close()


async def test_max_age_roll_and_removal_leaves_no_failed_background_task(
    data_dir: Path, loop_errors: list[dict[str, Any]]
) -> None:
    engine = await Engine.open(data_dir, retention_interval_s=0.1)
    await engine.create_stream(cfg(max_age_s=0.2))
    await engine.publish("r.x", b"soon old")
    assert await wait_until(lambda: engine.stream_info("r").messages == 0, timeout=3)
    await asyncio.sleep(0.2)
    await engine.close()
    gc.collect()
    assert [c.get("message") for c in loop_errors] == []
    engine = await Engine.open(data_dir, retention_interval_s=0.1)
    try:
        p = engine.stream_info("r").partitions[0]
        assert (p.first_offset, p.next_offset, p.messages) == (1, 1, 0)
        assert (await engine.publish("r.x", b"next")).offset == 1
    finally:
        await engine.close()


# -- max_msgs_per_subject (last-value streams) -----------------------------------------------


async def test_last_value_stream_reads_only_the_latest_per_subject(
    engine: Engine, data_dir: Path
) -> None:
    await engine.create_stream(cfg(max_msgs_per_subject=1, segment_bytes=1024))
    await engine.publish("r.keep", b"K" * 50)
    for i in range(300):
        await engine.publish(f"r.s{i % 3}", payload(i, 60))
    msgs = await read_all(engine, "r", 0)
    assert [(m.subject, m.payload) for m in msgs] == [
        ("r.keep", b"K" * 50),
        ("r.s0", payload(297, 60)),
        ("r.s1", payload(298, 60)),
        ("r.s2", payload(299, 60)),
    ]
    assert [m.offset for m in msgs] == [0, 298, 299, 300]
    assert [m.offset for m in engine.fetch("r", 0, 1, 10)] == [298, 299, 300], "gaps are skipped"
    for subject, expected in (("r.keep", b"K" * 50), ("r.s0", payload(297, 60)), ("r.s2", payload(299, 60))):
        last = engine.last_message("r", subject)
        assert last is not None and last.payload == expected

    files = log_files(data_dir)
    assert files[0] == f"{0:020d}.log", "the segment holding r.keep's current message is kept"
    assert len(files) <= 3, f"fully superseded segments are removed from disk: {files}"
    assert len(files) == engine.stream_info("r").partitions[0].segments

    # Once r.keep is superseded too, its old segment goes at the next roll.
    await engine.publish("r.keep", b"K2")
    for i in range(300, 330):
        await engine.publish(f"r.s{i % 3}", payload(i, 60))
    assert f"{0:020d}.log" not in log_files(data_dir)
    assert [(m.subject, m.payload) for m in await read_all(engine, "r", 0)] == [
        ("r.keep", b"K2"),
        ("r.s0", payload(327, 60)),
        ("r.s1", payload(328, 60)),
        ("r.s2", payload(329, 60)),
    ]


async def test_last_value_stream_with_several_partitions(engine: Engine) -> None:
    await engine.create_stream(cfg(partitions=3, max_msgs_per_subject=1, segment_bytes=1024))
    for i in range(200):
        await engine.publish(f"r.s{i % 10}", payload(i, 40), key=f"s{i % 10}")
    latest = {}
    for p in range(3):
        for m in await read_all(engine, "r", p):
            assert m.subject not in latest
            latest[m.subject] = m.payload
    assert latest == {f"r.s{n}": payload(190 + n, 40) for n in range(10)}


async def test_per_subject_limit_above_one(engine: Engine) -> None:
    await engine.create_stream(cfg(max_msgs_per_subject=2, segment_bytes=1024))
    for i in range(100):
        await engine.publish(f"r.s{i % 4}", payload(i, 50))
    msgs = await read_all(engine, "r", 0)
    assert [m.payload for m in msgs] == [payload(i, 50) for i in range(92, 100)]


async def test_last_value_stream_survives_reopen(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(max_msgs_per_subject=1, segment_bytes=1024))
    await engine.publish("r.keep", b"K")
    for i in range(100):
        await engine.publish(f"r.s{i % 2}", payload(i, 60))
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert [(m.subject, m.payload) for m in await read_all(engine, "r", 0)] == [
            ("r.keep", b"K"),
            ("r.s0", payload(98, 60)),
            ("r.s1", payload(99, 60)),
        ]
        last = engine.last_message("r", "r.s1")
        assert last is not None and last.payload == payload(99, 60)
        ack = await engine.publish("r.s0", b"new")
        assert ack.offset == 101
        assert [m.subject for m in await read_all(engine, "r", 0)] == ["r.keep", "r.s1", "r.s0"]
    finally:
        await engine.close()


async def test_last_value_stream_survives_reopen_when_seals_had_time(data_dir: Path) -> None:
    """Many subjects: segments die several rolls after their seal finished (the usual case)."""
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(max_msgs_per_subject=1, segment_bytes=1024, durability="always"))
    await engine.publish("r.keep", b"K")
    for i in range(240):
        await engine.publish(f"r.s{i % 12}", payload(i, 60))
    before = [(m.offset, m.subject, m.payload) for m in await read_all(engine, "r", 0)]
    assert [b[1] for b in before] == ["r.keep"] + [f"r.s{n}" for n in range(12)]
    files_before = log_files(data_dir)
    assert len(files_before) < 12, "superseded segments were removed"
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert [(m.offset, m.subject, m.payload) for m in await read_all(engine, "r", 0)] == before
        assert log_files(data_dir) == files_before
        last = engine.last_message("r", "r.s11")
        assert last is not None and last.payload == payload(239, 60)
        ack = await engine.publish("r.s0", b"new")
        assert ack.offset == 241
        msgs = await read_all(engine, "r", 0)
        assert [m.subject for m in msgs] == ["r.keep"] + [f"r.s{n}" for n in range(1, 12)] + ["r.s0"]
    finally:
        await engine.close()


async def test_max_msgs_retention_survives_reopen(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(max_msgs=50))
    for i in range(400):
        await engine.publish("r.x", payload(i))
    before = [(m.offset, m.payload) for m in await read_all(engine, "r", 0)]
    first = engine.stream_info("r").partitions[0].first_offset
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert engine.stream_info("r").partitions[0].first_offset == first
        assert [(m.offset, m.payload) for m in await read_all(engine, "r", 0)] == before
        assert (await engine.publish("r.x", b"next")).offset == 400
    finally:
        await engine.close()


async def test_max_msgs_retention_survives_reopen_when_seals_had_time(data_dir: Path) -> None:
    """As above, but every publish waits for its fsync, so background seals finish first."""
    engine = await Engine.open(data_dir)
    await engine.create_stream(cfg(max_msgs=50, durability="always"))
    for i in range(400):
        await engine.publish("r.x", payload(i))
    before = [(m.offset, m.payload) for m in await read_all(engine, "r", 0)]
    first = engine.stream_info("r").partitions[0].first_offset
    assert first > 0
    await engine.close()
    engine = await Engine.open(data_dir)
    try:
        assert engine.stream_info("r").partitions[0].first_offset == first
        assert [(m.offset, m.payload) for m in await read_all(engine, "r", 0)] == before
        assert (await engine.publish("r.x", b"next")).offset == 400
    finally:
        await engine.close()


# -- unlimited -------------------------------------------------------------------------------


async def test_unlimited_retention_keeps_everything(engine: Engine, data_dir: Path) -> None:
    await engine.create_stream(cfg(segment_bytes=1024))
    for i in range(1000):
        await engine.publish(f"r.s{i % 7}", payload(i, 80))
    await asyncio.sleep(1.2)  # at least one background pass
    info = engine.stream_info("r").partitions[0]
    assert (info.first_offset, info.next_offset, info.messages) == (0, 1000, 1000)
    assert info.segments > 50
    assert len(log_files(data_dir)) == info.segments
    assert [m.payload for m in await read_all(engine, "r", 0)] == [payload(i, 80) for i in range(1000)]


# -- property: the newest max_msgs messages always survive -----------------------------------


async def _run_retention_steps(
    partitions: int, max_msgs: int, steps: list[tuple[int, int, str | None]]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        engine = await Engine.open(folder)
        try:
            await engine.create_stream(
                cfg(partitions=partitions, max_msgs=max_msgs, segment_bytes=1024, durability="never")
            )
            sent: list[tuple[int, int, bytes]] = []
            for n, (subject, size, key) in enumerate(steps):
                body = (b"%05d|" % n + b"#" * size)[: max(size, 6)]
                ack = await engine.publish(f"r.s{subject}", body, key=key)
                sent.append((ack.partition, ack.offset, body))
                have = readable(engine, "r")
                keep = min(len(sent), max_msgs)
                assert len(have) >= keep, f"step {n}: {len(have)} left, limit {max_msgs}"
                for p, offset, expected in sent[-keep:]:
                    assert have.get((p, offset)) == expected, f"step {n}: lost {p}@{offset}"
                for where, got in have.items():
                    assert got == next(b for p, o, b in sent if (p, o) == where)
        finally:
            await engine.close()


step_strategy = st.tuples(
    st.integers(0, 3),
    st.integers(0, 700),
    st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "e"])),
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(max_msgs=st.integers(1, 40), steps=st.lists(step_strategy, min_size=1, max_size=80))
def test_property_newest_messages_survive_single_partition(
    max_msgs: int, steps: list[tuple[int, int, str | None]]
) -> None:
    asyncio.run(_run_retention_steps(1, max_msgs, steps))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.generate],  # no shrinking: the minimal case is the deterministic test above
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    partitions=st.integers(2, 3),
    max_msgs=st.integers(1, 40),
    steps=st.lists(step_strategy, min_size=1, max_size=80),
)
def test_property_newest_messages_survive_several_partitions(
    partitions: int, max_msgs: int, steps: list[tuple[int, int, str | None]]
) -> None:
    asyncio.run(_run_retention_steps(partitions, max_msgs, steps))
