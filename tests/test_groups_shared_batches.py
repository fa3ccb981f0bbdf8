"""Shared groups settling many deliveries at once (``ack_batch``) and reading ahead in chunks.

``ack_batch`` takes the settle steps of ``ack`` for each delivery with one state-log write;
these tests cover the cases off its usual path (failures remembered, keys held) and that what
it settles survives a reopen. The read-ahead tests fetch in chunks across the points where the
group reads the log again, with publishes and a purge in between, and check that every message
comes once and in order. Real engines on temporary data folders; nothing is mocked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pigeon.engine import Engine, SharedGroupConfig, StreamConfig

SUBJECT = "batches.run"


async def open_stream(path: Path, name: str) -> Engine:
    engine = await Engine.open(path)
    await engine.create_stream(StreamConfig(name, ("batches.>",)))
    return engine


async def test_ack_batch_releases_the_next_message_of_each_key(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "keyed")
    try:
        for key in ("a", "b"):
            for i in range(2):
                await engine.publish(SUBJECT, f"{key}{i}".encode(), key=key)
        group = await engine.shared_group("keyed", SharedGroupConfig("g", ack_wait_s=10, key_ordered=True))
        member = group.member()
        first = await member.fetch(10, 0.5)
        assert sorted(d.message.payload for d in first) == [b"a0", b"b0"]
        assert await member.fetch(10, 0.1) == [], "a1 and b1 wait for their keys"
        await member.ack_batch(first)
        second = await member.fetch(10, 1)
        assert sorted(d.message.payload for d in second) == [b"a1", b"b1"]
    finally:
        await engine.close()


async def test_ack_batch_after_a_failure_and_reopen(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "failing")
    try:
        for i in range(6):
            await engine.publish(SUBJECT, str(i).encode())
        config = SharedGroupConfig("g", ack_wait_s=10, max_deliver=5)
        group = await engine.shared_group("failing", config)
        member = group.member()
        deliveries = await member.fetch(6, 1)
        assert [d.offset for d in deliveries] == list(range(6))
        await deliveries[0].nack()  # the group now remembers a failure
        await member.ack_batch(deliveries[1:])
        [again] = await member.fetch(10, 1)
        assert again.offset == 0 and again.delivery_count == 2
        lag = engine.group_lag("failing", "g")[0]
        assert (lag.committed, lag.in_flight) == (0, 1)
    finally:
        await engine.close()
    engine = await Engine.open(data_dir)
    try:
        group = await engine.shared_group("failing", config)
        # The batch was in the state log: after the reopen only offset 0 is left to do.
        [left] = await group.member().fetch(10, 1)
        assert left.offset == 0
        await left.ack()
        assert engine.group_lag("failing", "g")[0].lag == 0
    finally:
        await engine.close()


async def test_chunked_fetches_across_read_ahead_see_every_message_once(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "chunks")
    try:
        await engine.publish_many(SUBJECT, [str(i).encode() for i in range(2500)])
        group = await engine.shared_group(
            "chunks", SharedGroupConfig("g", ack_wait_s=30, max_ack_pending=10_000)
        )
        member = group.member()
        seen: list[int] = []
        while len(seen) < 2500:
            chunk = await member.fetch(100, 1)
            assert chunk, f"stopped after {len(seen)}"
            seen += [int(d.message.payload) for d in chunk]
            await member.ack_batch(chunk)
            if len(seen) == 1000:
                # Appended after the group read ahead: still delivered, after the rest.
                await engine.publish_many(SUBJECT, [str(i).encode() for i in range(2500, 2600)])
        seen += [int(d.message.payload) for d in await member.fetch(200, 1)]
        assert seen == list(range(2600))
        assert await member.fetch(10, 0.1) == []
    finally:
        await engine.close()


async def test_a_purge_drops_what_was_read_ahead(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "purged")
    try:
        await engine.publish_many(SUBJECT, [str(i).encode() for i in range(1500)])
        group = await engine.shared_group(
            "purged", SharedGroupConfig("g", ack_wait_s=30, max_ack_pending=10_000)
        )
        member = group.member()
        # 10 chunks of 100 empty the first read ahead, and the group reads on from 1000.
        for _ in range(10):
            await member.ack_batch(await member.fetch(100, 1))
        await engine.purge_stream("purged")
        await engine.publish(SUBJECT, b"after")
        [fresh] = await member.fetch(10, 1)
        assert fresh.message.payload == b"after"
        assert await member.fetch(10, 0.1) == []
    finally:
        await engine.close()


async def test_a_used_up_read_ahead_is_refilled_while_the_group_is_idle(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "idle")
    try:
        await engine.publish_many(SUBJECT, [str(i).encode() for i in range(1500)])
        config = SharedGroupConfig("g", ack_wait_s=30, max_ack_pending=10_000)
        group = await engine.shared_group("idle", config)
        member = group.member()
        for _ in range(10):  # the first read ahead (1000 messages) used up
            await member.ack_batch(await member.fetch(100, 1))
        await asyncio.sleep(0.01)  # the loop idles: the group reads on meanwhile
        [partition] = group._parts
        assert [m.offset for m in partition.ahead] == list(range(1000, 1500))
        # Stored after that read: still delivered, in order, after what was read ahead.
        await engine.publish_many(SUBJECT, [str(i).encode() for i in range(1500, 1600)])
        seen: list[int] = []
        while chunk := await member.fetch(100, 0.2):
            seen += [int(d.message.payload) for d in chunk]
            await member.ack_batch(chunk)
        assert seen == list(range(1000, 1600))
    finally:
        await engine.close()


async def test_ack_waiting_settles_what_waits_to_come_again(data_dir: Path) -> None:
    engine = await open_stream(data_dir, "waiting")
    config = SharedGroupConfig("g", ack_wait_s=30)
    try:
        for i in range(4):
            await engine.publish(SUBJECT, str(i).encode())
        member = (await engine.shared_group("waiting", config)).member()
        deliveries = await member.fetch(4, 1)
        for delivery in deliveries[:3]:
            await delivery.nack()  # all three wait to come again
        await member.ack_waiting(below=2)  # settles offsets 0 and 1, not 2
        await deliveries[3].ack()
        [again] = await member.fetch(10, 1)
        assert (again.offset, again.delivery_count) == (2, 2)
    finally:
        await engine.close()
    engine = await Engine.open(data_dir)
    try:
        # Recorded: after a reopen only offset 2 is left, unleased since the restart.
        [left] = await (await engine.shared_group("waiting", config)).member().fetch(10, 1)
        assert left.offset == 2
    finally:
        await engine.close()
