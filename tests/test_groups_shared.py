"""Behaviour of shared (queue-style) consumer groups of the embedded engine.

Any member gets messages from every partition; each message is leased to one member for
``ack_wait``; ack / nack / term / in_progress settle it; an expired lease redelivers; a
backoff delays redeliveries; after ``max_deliver`` the message goes to the dead-letter
stream. Every test talks to a real engine on a temporary data folder; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from pigeon.engine import (
    Backoff,
    Delivery,
    Engine,
    OrderedGroupConfig,
    SharedGroupConfig,
    StartAt,
    StreamConfig,
)
from pigeon.errors import (
    AlreadySettledError,
    DeliveryNotOwnedError,
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidNameError,
    MemberNotFoundError,
    StreamNotFoundError,
    SubjectOverlapError,
)
from pigeon.message import Headers

STREAM = "jobs"
SUBJECT = "jobs.run"


class Env:
    """An engine on a data folder that a test can close and open again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine: Engine

    async def open(self) -> Engine:
        self.engine = await Engine.open(self.path)
        return self.engine

    async def reopen(self) -> Engine:
        await self.engine.close()
        return await self.open()


@pytest.fixture
async def env(data_dir: Path):
    env = Env(data_dir)
    await env.open()
    try:
        yield env
    finally:
        await env.engine.close()


@pytest.fixture
async def engine(env: Env) -> Engine:
    return env.engine


async def make_stream(engine: Engine, partitions: int = 1, name: str = STREAM) -> None:
    await engine.create_stream(StreamConfig(name, (f"{name}.>",), partitions=partitions))


async def publish(engine: Engine, n: int, *, start: int = 0, keyed: bool = False) -> list[tuple[int, int]]:
    """Publish payloads b"<i>"; returns (partition, offset) of each."""
    where = []
    for i in range(start, start + n):
        ack = await engine.publish(SUBJECT, str(i).encode(), key=f"k{i}" if keyed else None)
        where.append((ack.partition, ack.offset))
    return where


async def fetch_n(member, n: int, timeout: float = 3.0, batch: int = 100) -> list[Delivery]:
    """Fetch until ``n`` deliveries arrived (or fail after ``timeout``)."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(out)} of {n} deliveries arrived within {timeout}s"
        out += await member.fetch(min(batch, n - len(out)), remaining)
    return out


def payloads(deliveries: list[Delivery]) -> list[int]:
    return [int(d.message.payload) for d in deliveries]


def dead_letters(engine: Engine, group: str, stream: str = STREAM):
    name = f"{stream}-{group}-dlq"
    if name not in engine.streams():
        return []
    return engine.fetch(name, 0, 0, 1000)


async def wait_for(predicate, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def totals(engine: Engine, group: str, stream: str = STREAM) -> dict[str, int]:
    lags = engine.group_lag(stream, group)
    return {
        field: sum(getattr(lag, field) for lag in lags)
        for field in ("head", "committed", "lag", "pending", "in_flight", "waiting")
    }


def fast(name: str = "workers", **kw) -> SharedGroupConfig:
    kw.setdefault("ack_wait_s", 0.3)
    return SharedGroupConfig(name, **kw)


# -- basic queue semantics -----------------------------------------------------------------------


async def test_any_member_gets_messages_from_all_partitions(engine: Engine) -> None:
    await make_stream(engine, partitions=4)
    where = await publish(engine, 20, keyed=True)
    assert len({p for p, _ in where}) == 4, "the keys should spread over every partition"
    group = await engine.shared_group(STREAM, fast())
    deliveries = await fetch_n(group.member(), 20)
    assert sorted(payloads(deliveries)) == list(range(20))
    assert {d.partition for d in deliveries} == {0, 1, 2, 3}
    assert all(d.delivery_count == 1 for d in deliveries)
    assert all(d.group == "workers" for d in deliveries)


async def test_each_message_is_leased_to_one_member_at_a_time(engine: Engine) -> None:
    await make_stream(engine, partitions=3)
    await publish(engine, 60, keyed=True)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    members = [group.member() for _ in range(4)]

    async def take(member) -> list[Delivery]:
        got: list[Delivery] = []
        while True:
            batch = await member.fetch(5, 0.2)
            if not batch:
                return got
            got += batch
            await asyncio.sleep(0)

    results = await asyncio.gather(*(take(m) for m in members))
    everything = [p for r in results for p in payloads(r)]
    assert sorted(everything) == list(range(60)), "each message exactly once while leased"
    assert sum(1 for r in results if r) >= 2, "more than one member should have got work"


async def test_acked_messages_are_not_delivered_again(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    await publish(engine, 10, keyed=True)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
    member = group.member()
    for d in await fetch_n(member, 10):
        await d.ack()
    assert await member.fetch(10, 0.5) == [], "nothing may come back after ack_wait passed"
    t = totals(engine, "workers")
    assert t["lag"] == 0 and t["pending"] == t["in_flight"] == t["waiting"] == 0


async def test_expired_lease_redelivers_and_fences_the_old_delivery(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
    a, b = group.member("a"), group.member("b")
    [old] = await a.fetch(1, 1)
    assert not old.cancelled.is_set()
    t0 = time.monotonic()
    [new] = await b.fetch(1, 2.0)
    assert time.monotonic() - t0 >= 0.15, "redelivered before the lease could expire"
    assert new.offset == old.offset and new.delivery_count == 2
    assert old.cancelled.is_set(), "the old delivery must learn it lost the lease"
    with pytest.raises(DeliveryNotOwnedError):
        await old.ack()
    assert totals(engine, "workers")["in_flight"] == 1, "the failed ack changed nothing"
    with pytest.raises(DeliveryNotOwnedError):
        await old.nack()
    with pytest.raises(DeliveryNotOwnedError):
        await old.term()
    with pytest.raises(DeliveryNotOwnedError):
        await old.in_progress()
    assert dead_letters(engine, "workers") == []
    await new.ack()
    assert await a.fetch(1, 0.4) == []


async def test_in_progress_keeps_the_lease_past_ack_wait(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
    a, b = group.member("a"), group.member("b")
    [d] = await a.fetch(1, 1)

    async def keep_alive() -> None:
        for _ in range(7):  # 0.7 s, far past ack_wait
            await asyncio.sleep(0.1)
            await d.in_progress()

    other, _ = await asyncio.gather(b.fetch(1, 0.7), keep_alive())
    assert other == [], "a message kept alive with in_progress must not be redelivered"
    assert not d.cancelled.is_set()
    await d.ack()
    assert await b.fetch(1, 0.4) == []


async def test_in_progress_on_one_lease_does_not_delay_the_expiry_of_others(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
    a, b = group.member("a"), group.member("b")
    kept, dropped = await fetch_n(a, 2)

    async def keep_alive() -> None:
        for _ in range(10):
            await asyncio.sleep(0.1)
            await kept.in_progress()

    t0 = time.monotonic()
    keeper = asyncio.ensure_future(keep_alive())
    try:
        got = await b.fetch(1, 1.0)
        waited = time.monotonic() - t0
    finally:
        await keeper
        await kept.ack()
    assert [(d.offset, d.delivery_count) for d in got] == [(dropped.offset, 2)]
    assert waited < 0.6, f"the abandoned lease expired after {waited:.2f}s, not ack_wait (0.2s)"
    assert dropped.cancelled.is_set()


async def test_leases_keep_expiring_after_repeated_in_progress(data_dir: Path) -> None:
    engine = await Engine.open(data_dir)
    close_error: BaseException | None = None
    try:
        await make_stream(engine)
        await publish(engine, 1)
        group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
        member = group.member()
        [d] = await member.fetch(1, 1)
        for _ in range(3):
            await d.in_progress()
        [again] = await member.fetch(1, 2)  # the lease is abandoned: it expires once
        assert (again.offset, again.delivery_count) == (0, 2)
        await again.ack()
        await publish(engine, 1, start=1)
        [later] = await member.fetch(1, 1)
        redelivered = await member.fetch(1, 1.5)
        assert [(x.offset, x.delivery_count) for x in redelivered] == [(later.offset, 2)], (
            "leases must keep expiring"
        )
    finally:
        try:
            await engine.close()
        except Exception as exc:
            close_error = exc
    assert close_error is None, f"engine.close() raised {close_error!r}"


async def test_nack_without_delay_redelivers_at_once(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    member = group.member()
    [d] = await member.fetch(1, 1)
    await d.nack()
    t0 = time.monotonic()
    [again] = await member.fetch(1, 2)
    assert time.monotonic() - t0 < 0.5
    assert again.offset == d.offset and again.delivery_count == 2


async def test_nack_with_delay_waits_at_least_the_delay(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    member = group.member()
    first, second = await fetch_n(member, 2)
    t0 = time.monotonic()
    await first.nack(0.4)
    assert await member.fetch(1, 0.2) == [], "redelivered before the nack delay"
    await second.ack()
    [again] = await member.fetch(1, 2)
    assert time.monotonic() - t0 >= 0.4
    assert again.offset == first.offset and again.delivery_count == 2


async def test_a_waiting_fetch_wakes_up_for_a_nacked_message(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    a, b = group.member("a"), group.member("b")
    [d] = await a.fetch(1, 1)
    waiting = asyncio.ensure_future(b.fetch(1, 3.0))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await d.nack()
    [again] = await waiting
    assert time.monotonic() - t0 < 1.0
    assert again.offset == d.offset and again.delivery_count == 2


async def test_member_leaving_hands_its_leases_on_at_once(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    a, b = group.member("a"), group.member("b")
    held = await fetch_n(a, 3)
    await a.leave()
    assert all(d.cancelled.is_set() for d in held)
    t0 = time.monotonic()
    again = await fetch_n(b, 3, timeout=2)
    assert time.monotonic() - t0 < 1.0, "a member that left should not hold messages for ack_wait"
    assert sorted(payloads(again)) == [0, 1, 2]
    with pytest.raises(DeliveryNotOwnedError):
        await held[0].ack()
    with pytest.raises(MemberNotFoundError):
        await a.fetch(1, 0.1)
    assert group.members() == ["b"]


# -- backoff, max_deliver and dead letters -------------------------------------------------------


async def test_redelivery_with_backoff_then_dead_letter_after_max_deliveries(engine: Engine) -> None:
    """Seed scenario: each redelivery waits at least its backoff; the 3rd failure dead-letters."""
    await make_stream(engine)
    await publish(engine, 1)
    delays = (0.15, 0.3)
    group = await engine.shared_group(
        STREAM, fast("retry", ack_wait_s=5, max_deliver=3, backoff=Backoff(delays_s=delays))
    )
    member = group.member()
    nacked_at = None
    gaps = []
    for attempt in (1, 2, 3):
        [d] = await member.fetch(1, 2.0)
        if nacked_at is not None:
            gaps.append(time.monotonic() - nacked_at)
        assert d.delivery_count == attempt
        nacked_at = time.monotonic()
        await d.nack(error=RuntimeError(f"failure {attempt}"))
    assert gaps[0] >= delays[0] and gaps[1] >= delays[1], gaps
    assert await member.fetch(1, 0.5) == [], "no delivery beyond max_deliver"
    [dead] = dead_letters(engine, "retry")
    assert dead.payload == b"0"
    assert dead.headers[Headers.DELIVERY_COUNT] == "3"
    assert dead.headers[Headers.ERROR_TYPE] == "RuntimeError"
    assert dead.headers[Headers.ERROR_MESSAGE] == "failure 3"
    first = datetime.fromisoformat(dead.headers[Headers.FIRST_FAILURE_AT])
    last = datetime.fromisoformat(dead.headers[Headers.LAST_FAILURE_AT])
    assert (last - first).total_seconds() >= sum(delays) - 0.01
    t = totals(engine, "retry")
    assert t["lag"] == 0 and t["waiting"] == 0


async def test_backoff_list_repeats_its_last_delay() -> None:
    backoff = Backoff(delays_s=(0.1, 0.2, 0.5))
    assert [backoff.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.5, 0.5, 0.5, 0.5]


async def test_backoff_exponential_is_capped_and_jittered() -> None:
    backoff = Backoff(initial_s=0.1, multiplier=2, max_s=0.5, jitter=0.5)
    rng = random.Random(7)
    for n, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        samples = [backoff.delay(n, rng) for _ in range(200)]
        assert all(base - 1e-9 <= s <= base * 1.5 + 1e-9 for s in samples), (n, min(samples), max(samples))
        assert max(samples) - min(samples) > base * 0.2, "jitter must spread the delays"
    exact = Backoff(initial_s=0.1, multiplier=3, max_s=1.0, jitter=0)
    assert [round(exact.delay(n), 9) for n in (1, 2, 3, 4)] == [0.1, 0.3, 0.9, 1.0]


async def test_exponential_backoff_delays_redeliveries(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    backoff = Backoff(initial_s=0.1, multiplier=2, max_s=0.15, jitter=0.2)
    group = await engine.shared_group(STREAM, fast("exp", ack_wait_s=5, max_deliver=4, backoff=backoff))
    member = group.member()
    gaps = []
    nacked_at = None
    for _ in range(4):
        [d] = await member.fetch(1, 2.0)
        if nacked_at is not None:
            gaps.append(time.monotonic() - nacked_at)
        nacked_at = time.monotonic()
        await d.nack()
    assert gaps[0] >= 0.1 and gaps[1] >= 0.15 and gaps[2] >= 0.15, gaps
    [dead] = dead_letters(engine, "exp")
    assert dead.headers[Headers.DELIVERY_COUNT] == "4"


async def test_lease_expiry_counts_as_a_failure_up_to_max_deliver(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast("expiring", ack_wait_s=0.15, max_deliver=2))
    member = group.member()
    [d1] = await member.fetch(1, 1)
    [d2] = await member.fetch(1, 2)
    assert (d1.delivery_count, d2.delivery_count) == (1, 2)
    await wait_for(lambda: dead_letters(engine, "expiring"), what="a dead letter")
    assert await member.fetch(1, 0.4) == []
    [dead] = dead_letters(engine, "expiring")
    assert dead.headers[Headers.DELIVERY_COUNT] == "2"
    assert "ack_wait" in dead.headers[Headers.ERROR_MESSAGE]
    with pytest.raises(DeliveryNotOwnedError):
        await d2.ack()


async def test_max_deliver_holds_when_a_member_leaves(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast("capped", ack_wait_s=10, max_deliver=2))
    a = group.member("a")
    [d] = await a.fetch(1, 1)
    await d.nack()
    [d] = await a.fetch(1, 1)
    assert d.delivery_count == 2
    await a.leave()
    again = await group.member("b").fetch(1, 0.3)
    assert [x.delivery_count for x in again if x.delivery_count > 2] == [], (
        "a message must not be delivered more than max_deliver times"
    )


async def test_max_deliver_holds_across_reopen(env: Env) -> None:
    engine = env.engine
    await make_stream(engine)
    await publish(engine, 1)
    config = fast("capped", ack_wait_s=10, max_deliver=2)
    group = await engine.shared_group(STREAM, config)
    member = group.member()
    [d] = await member.fetch(1, 1)
    await d.nack()
    [d] = await member.fetch(1, 1)
    assert d.delivery_count == 2
    engine = await env.reopen()
    again = await engine.group(STREAM, "capped").member().fetch(1, 0.3)
    assert [x.delivery_count for x in again if x.delivery_count > 2] == [], (
        "a message must not be delivered more than max_deliver times"
    )
    assert len(dead_letters(engine, "capped")) == (0 if again else 1)


async def test_term_dead_letter_keeps_the_original_and_adds_failure_headers(engine: Engine) -> None:
    await make_stream(engine, partitions=3)
    ack = await engine.publish(SUBJECT, b"payload-1", key="customer-7", headers={"trace": "abc", "x": "1"})
    group = await engine.shared_group(STREAM, fast("billing"))
    [d] = await group.member().fetch(1, 1)
    before = datetime.now().astimezone()
    await d.term(ValueError("unparseable invoice"))
    [dead] = dead_letters(engine, "billing")
    assert dead.payload == b"payload-1"
    assert dead.key == "customer-7"
    assert dead.headers["trace"] == "abc" and dead.headers["x"] == "1"
    h = dead.headers
    assert h[Headers.ERROR_TYPE] == "ValueError"
    assert h[Headers.ERROR_MESSAGE] == "unparseable invoice"
    assert h[Headers.DELIVERY_COUNT] == "1"
    assert h[Headers.GROUP] == "billing"
    assert h[Headers.ORIGINAL_STREAM] == STREAM
    assert h[Headers.ORIGINAL_PARTITION] == str(ack.partition)
    assert h[Headers.ORIGINAL_OFFSET] == str(ack.offset)
    assert h[Headers.ORIGINAL_SUBJECT] == SUBJECT
    for name in (Headers.FIRST_FAILURE_AT, Headers.LAST_FAILURE_AT):
        stamp = datetime.fromisoformat(h[name])
        assert stamp.tzinfo is not None
        assert abs((stamp - before).total_seconds()) < 5
    # Not redelivered to the group.
    assert await group.member().fetch(1, 0.5) == []


async def test_dead_letter_stream_is_an_ordinary_stream(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast("g"))
    for d in await fetch_n(group.member(), 3):
        await d.term("no")
    dlq = f"{STREAM}-g-dlq"
    assert dlq in engine.streams()
    assert engine.stream_info(dlq).messages == 3
    # It can be consumed by a group like any other stream.
    reader = await engine.shared_group(dlq, fast("redrive"))
    got = await fetch_n(reader.member(), 3)
    assert sorted(d.message.payload for d in got) == [b"0", b"1", b"2"]
    assert all(d.message.headers[Headers.ERROR_MESSAGE] == "no" for d in got)


async def test_term_without_dead_letters_drops_the_message(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast("quiet", dead_letter=False))
    member = group.member()
    [d] = await member.fetch(1, 1)
    await d.term("drop")
    assert f"{STREAM}-quiet-dlq" not in engine.streams()
    assert await member.fetch(1, 0.5) == []
    assert totals(engine, "quiet")["lag"] == 0


# -- flow control --------------------------------------------------------------------------------


async def test_max_ack_pending_bounds_unacked_messages_of_the_group(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    await publish(engine, 10, keyed=True)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10, max_ack_pending=3))
    a, b = group.member("a"), group.member("b")
    first = await a.fetch(10, 1)
    assert len(first) == 3
    assert await b.fetch(10, 0.2) == [], "the group's limit holds for every member"
    assert await a.fetch(10, 0.2) == []
    waiting = asyncio.ensure_future(b.fetch(10, 2.0))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await first[0].ack()
    more = await waiting
    assert time.monotonic() - t0 < 1.0, "an ack must wake a fetch blocked by max_ack_pending"
    assert len(more) == 1
    assert totals(engine, "workers")["in_flight"] == 3


async def test_max_member_pending_bounds_one_member(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 10)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10, max_member_pending=2))
    a, b = group.member("a"), group.member("b")
    got_a = await a.fetch(10, 1)
    assert len(got_a) == 2
    assert await a.fetch(10, 0.2) == []
    got_b = await b.fetch(10, 1)
    assert len(got_b) == 2
    await got_a[0].ack()
    assert len(await a.fetch(10, 1)) == 1


# -- key ordering -------------------------------------------------------------------------------


async def test_per_key_order_with_many_members(engine: Engine) -> None:
    """Seed scenario: same key never in flight twice, offset order; other keys in parallel."""
    await make_stream(engine, partitions=4)
    keys = [f"user-{i}" for i in range(12)]
    per_key = 8
    expected: dict[str, list[int]] = defaultdict(list)
    for i in range(per_key):
        for key in keys:
            ack = await engine.publish(SUBJECT, f"{key}:{i}".encode(), key=key)
            expected[key].append(ack.offset)
    total = per_key * len(keys)
    group = await engine.shared_group(STREAM, fast("ordered-keys", ack_wait_s=5, key_ordered=True))
    rng = random.Random(1234)
    holding: dict[str, Delivery] = {}
    delivered: dict[str, list[int]] = defaultdict(list)
    acked: dict[str, list[int]] = defaultdict(list)
    per_member: dict[str, int] = defaultdict(int)
    most_keys_at_once = 0
    violations: list[str] = []

    async def process(name: str, d: Delivery) -> None:
        nonlocal most_keys_at_once
        key = d.message.key
        assert key is not None
        if key in holding:
            violations.append(f"{key}: {d.offset} delivered while {holding[key].offset} in flight")
        holding[key] = d
        delivered[key].append(d.offset)
        per_member[name] += 1
        most_keys_at_once = max(most_keys_at_once, len(holding))
        await asyncio.sleep(rng.random() * 0.004)
        fail = d.delivery_count == 1 and rng.random() < 0.15
        del holding[key]
        if fail:
            await d.nack()
        else:
            acked[key].append(d.offset)
            await d.ack()

    async def worker(name: str) -> None:
        member = group.member(name)
        while sum(map(len, acked.values())) < total:
            batch = await member.fetch(3, 0.1)
            await asyncio.gather(*(process(name, d) for d in batch))

    await asyncio.wait_for(asyncio.gather(*(worker(f"m{i}") for i in range(8))), 20)
    assert violations == []
    for key in keys:
        assert acked[key] == expected[key], f"{key} acked out of order"
        seq = delivered[key]
        assert seq == sorted(seq), f"{key} delivered out of offset order: {seq}"
    assert most_keys_at_once >= 2, "different keys should be processed in parallel"
    assert sum(1 for n in per_member.values() if n) >= 2, "work should spread over members"


async def test_key_ordered_group_parks_later_messages_of_a_failing_key(engine: Engine) -> None:
    await make_stream(engine)
    await engine.publish(SUBJECT, b"a1", key="a")
    await engine.publish(SUBJECT, b"a2", key="a")
    await engine.publish(SUBJECT, b"b1", key="b")
    group = await engine.shared_group(STREAM, fast("ko", ack_wait_s=10, key_ordered=True))
    a, b = group.member("a"), group.member("b")
    got = await a.fetch(10, 0.5)
    assert sorted(d.message.payload for d in got) == [b"a1", b"b1"]
    a1 = next(d for d in got if d.message.payload == b"a1")
    await a1.nack(0.2)
    assert await b.fetch(10, 0.1) == [], "a2 must wait for a1"
    [again] = await b.fetch(10, 2)
    assert again.message.payload == b"a1" and again.delivery_count == 2
    assert await a.fetch(10, 0.1) == []
    await again.ack()
    [a2] = await a.fetch(10, 1)
    assert a2.message.payload == b"a2"


async def test_key_ordering_holds_after_reopen(env: Env) -> None:
    engine = env.engine
    await make_stream(engine)
    await engine.publish(SUBJECT, b"A", key="k")
    await engine.publish(SUBJECT, b"B", key="k")
    config = fast("ko", ack_wait_s=10, key_ordered=True)
    group = await engine.shared_group(STREAM, config)
    [first] = await group.member().fetch(10, 0.3)
    assert first.message.payload == b"A"
    engine = await env.reopen()
    group = await engine.shared_group(STREAM, config)
    got = await group.member().fetch(10, 0.3)
    assert [(d.message.payload, d.delivery_count) for d in got] == [(b"A", 2)], (
        "B must not be in flight together with the redelivered A"
    )


# -- long polling and iteration ----------------------------------------------------------------


async def test_fetch_long_polls_and_returns_as_soon_as_a_message_arrives(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    group = await engine.shared_group(STREAM, fast())
    member = group.member()
    waiting = asyncio.ensure_future(member.fetch(10, 3.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    t0 = time.monotonic()
    await publish(engine, 1)
    got = await waiting
    assert time.monotonic() - t0 < 0.5, "fetch should return well before its timeout"
    assert payloads(got) == [0]


async def test_fetch_returns_empty_after_the_timeout(engine: Engine) -> None:
    await make_stream(engine)
    group = await engine.shared_group(STREAM, fast())
    t0 = time.monotonic()
    assert await group.member().fetch(5, 0.3) == []
    assert 0.28 <= time.monotonic() - t0 < 1.5


async def test_async_iteration_yields_every_message(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    await publish(engine, 6, keyed=True)
    group = await engine.shared_group(STREAM, fast())
    seen = []

    async def run() -> None:
        async for d in group.member():
            seen.append(int(d.message.payload))
            await d.ack()
            if len(seen) == 8:
                return

    task = asyncio.ensure_future(run())
    await wait_for(lambda: len(seen) == 6, what="six messages")
    await publish(engine, 2, start=6, keyed=True)
    await asyncio.wait_for(task, 3)
    assert sorted(seen) == list(range(8))


# -- lag ---------------------------------------------------------------------------------------


async def test_lag_splits_unfinished_into_pending_in_flight_and_waiting(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 6)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    [lag] = engine.group_lag(STREAM, "workers")
    assert (lag.head, lag.committed, lag.lag, lag.pending, lag.in_flight, lag.waiting) == (6, 0, 6, 6, 0, 0)
    member = group.member()
    d0, d1, d2 = await fetch_n(member, 3, batch=3)
    [lag] = engine.group_lag(STREAM, "workers")
    assert (lag.pending, lag.in_flight, lag.waiting, lag.committed) == (3, 3, 0, 0)
    await d0.ack()
    await d1.nack(30)
    [lag] = engine.group_lag(STREAM, "workers")
    assert (lag.head, lag.committed, lag.lag) == (6, 1, 5)
    assert (lag.pending, lag.in_flight, lag.waiting) == (3, 1, 1)
    await d2.ack()
    [lag] = engine.group_lag(STREAM, "workers")
    assert lag.committed == 1, "offset 1 is not finished: committed cannot pass it"
    assert (lag.pending, lag.in_flight, lag.waiting) == (3, 0, 1)
    assert lag.pending + lag.in_flight + lag.waiting == 6 - 2


# -- durability across close/reopen and crashes ------------------------------------------------


async def test_crash_before_ack_redelivered_after_reopen(env: Env) -> None:
    """Seed scenario: delivered-but-unacked messages come back after a restart; acked ones do not."""
    engine = env.engine
    await make_stream(engine, partitions=2)
    await publish(engine, 6, keyed=True)
    config = fast(ack_wait_s=30)
    group = await engine.shared_group(STREAM, config)
    deliveries = await fetch_n(group.member(), 6)
    for d in deliveries:
        if int(d.message.payload) % 2 == 0:
            await d.ack()
    engine = await env.reopen()
    assert engine.groups(STREAM) == ["workers"]
    group = engine.group(STREAM, "workers")
    again = await fetch_n(group.member(), 3)
    assert sorted(payloads(again)) == [1, 3, 5]
    assert all(d.delivery_count == 2 for d in again)
    assert await group.member().fetch(10, 0.4) == []
    assert (await engine.shared_group(STREAM, config)) is group, "same config reopens the same group"


async def test_unacked_messages_filling_max_ack_pending_come_back_after_reopen(env: Env) -> None:
    """A member took max_ack_pending messages and died: after the restart they are delivered
    again (the limit they fill must not hold back their own redelivery), then the rest."""
    engine = env.engine
    await make_stream(engine)
    await publish(engine, 10)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=30, max_ack_pending=4))
    first = await fetch_n(group.member(), 4)
    assert payloads(first) == [0, 1, 2, 3]
    engine = await env.reopen()
    member = engine.group(STREAM, "workers").member()
    again = await fetch_n(member, 4, timeout=2)
    assert payloads(again) == [0, 1, 2, 3]
    assert all(d.delivery_count == 2 for d in again)
    assert await member.fetch(10, 0.2) == [], "still at max_ack_pending"
    for d in again:
        await d.ack()
    rest = await fetch_n(member, 4, timeout=2)
    assert payloads(rest) == [4, 5, 6, 7]
    assert all(d.delivery_count == 1 for d in rest)


async def test_delivery_counts_nacks_and_terms_survive_reopen(env: Env) -> None:
    engine = env.engine
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.15, max_deliver=10))
    member = group.member()
    d0, d1, d2 = await fetch_n(member, 3)
    await d1.term("bad")
    await d2.nack(0.6)
    # Let offset 0's lease expire once, and take it again: two deliveries so far.
    [d0b] = await member.fetch(1, 2)
    assert d0b.offset == d0.offset and d0b.delivery_count == 2
    engine = await env.reopen()
    member = engine.group(STREAM, "workers").member()
    [again] = await member.fetch(5, 0.3)
    assert (again.offset, again.delivery_count) == (0, 3)
    await again.ack()
    assert await member.fetch(5, 0.1) == [], "the nack delay still holds after reopen"
    [late] = await member.fetch(5, 2)
    assert (late.offset, late.delivery_count) == (2, 2)
    await late.ack()
    assert await member.fetch(5, 0.4) == [], "the termed message stays dead"
    assert len(dead_letters(engine, "workers")) == 1


CRASH_CHILD = r"""
import asyncio, sys
from pigeon.engine import Engine, StreamConfig, SharedGroupConfig

async def main(path):
    engine = await Engine.open(path)
    await engine.create_stream(StreamConfig("jobs", ("jobs.>",), partitions=2))
    group = await engine.shared_group("jobs", SharedGroupConfig("workers", ack_wait_s=30))
    for i in range(6):
        await engine.publish("jobs.run", str(i).encode(), key=f"k{i}")
    member = group.member()
    got = []
    while len(got) < 6:
        got += await member.fetch(6, 1.0)
    for d in got:
        if int(d.message.payload) % 2 == 0:
            await d.ack()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1]))
"""


async def test_crash_before_ack_redelivered_after_sigkill(data_dir: Path) -> None:
    """Seed scenario with a real crash: the process is SIGKILLed holding unacked messages."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_CHILD, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    engine = await Engine.open(data_dir)
    try:
        group = engine.group(STREAM, "workers")
        again = await fetch_n(group.member(), 3)
        assert sorted(payloads(again)) == [1, 3, 5]
        assert all(d.delivery_count == 2 for d in again)
        assert await group.member().fetch(10, 0.4) == []
    finally:
        await engine.close()


# -- where a new group starts ------------------------------------------------------------------


async def test_new_group_starts_at_earliest_by_default(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast())
    assert payloads(await fetch_n(group.member(), 3)) == [0, 1, 2]


async def test_new_group_starts_at_latest_fixed_at_creation(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast(start=StartAt.latest()))
    await publish(engine, 2, start=3)
    got = await fetch_n(group.member(), 2)
    assert payloads(got) == [3, 4]
    assert await group.member().fetch(5, 0.2) == []


async def test_start_latest_stays_fixed_at_creation_across_reopen(env: Env) -> None:
    engine = env.engine
    await make_stream(engine)
    await publish(engine, 3)
    await engine.shared_group(STREAM, fast(start=StartAt.latest()))
    await publish(engine, 2, start=3)
    engine = await env.reopen()
    group = engine.group(STREAM, "workers")
    got = await group.member().fetch(5, 0.3)
    assert payloads(got) == [3, 4], "messages published after creation must not be skipped"


async def test_new_group_starts_at_offset(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 5)
    group = await engine.shared_group(STREAM, fast(start=StartAt.offset(3)))
    assert payloads(await fetch_n(group.member(), 2)) == [3, 4]
    assert engine.group_lag(STREAM, "workers")[0].committed == 3


async def test_new_group_starts_at_time(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    await asyncio.sleep(0.05)
    cut = time.time()
    await asyncio.sleep(0.05)
    await publish(engine, 2, start=2)
    group = await engine.shared_group(STREAM, fast(start=StartAt.time(cut)))
    assert payloads(await fetch_n(group.member(), 2)) == [2, 3]
    assert await group.member().fetch(5, 0.2) == []


# -- bad input ---------------------------------------------------------------------------------


async def test_unknown_group_and_unknown_stream(engine: Engine) -> None:
    await make_stream(engine)
    await engine.shared_group(STREAM, fast())
    with pytest.raises(GroupNotFoundError):
        engine.group(STREAM, "nope")
    with pytest.raises(GroupNotFoundError):
        engine.group_lag(STREAM, "nope")
    with pytest.raises(GroupNotFoundError):
        await engine.delete_group(STREAM, "nope")
    with pytest.raises(StreamNotFoundError):
        await engine.shared_group("missing", fast())
    with pytest.raises(StreamNotFoundError):
        engine.group("missing", "workers")
    with pytest.raises(StreamNotFoundError):
        engine.groups("missing")
    assert engine.groups(STREAM) == ["workers"]
    assert "missing" not in engine.streams()


async def test_settling_twice_raises_already_settled_and_changes_nothing(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    member = group.member()
    d0, d1 = await fetch_n(member, 2)
    await d0.ack()
    before = engine.group_lag(STREAM, "workers")
    for settle in (d0.ack, d0.nack, d0.term):
        with pytest.raises(AlreadySettledError):
            await settle()
    with pytest.raises(AlreadySettledError):
        await d0.in_progress()
    assert engine.group_lag(STREAM, "workers") == before
    await d1.term("x")
    with pytest.raises(AlreadySettledError):
        await d1.ack()
    assert len(dead_letters(engine, "workers")) == 1


@pytest.mark.parametrize("delay", [-1, -0.001, 365 * 24 * 3600 + 1, math.inf, math.nan, "1", True])
async def test_nack_delay_out_of_range_is_refused_and_changes_nothing(engine: Engine, delay) -> None:
    await make_stream(engine)
    await publish(engine, 1)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    [d] = await group.member().fetch(1, 1)
    before = engine.group_lag(STREAM, "workers")
    with pytest.raises(InvalidConfigError):
        await d.nack(delay)
    assert not d.settled and not d.cancelled.is_set()
    assert engine.group_lag(STREAM, "workers") == before
    await d.ack()
    assert totals(engine, "workers")["lag"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ack_wait_s": 0},
        {"ack_wait_s": -1},
        {"ack_wait_s": "5"},
        {"max_deliver": 0},
        {"max_deliver": -2},
        {"max_deliver": 1.5},
        {"max_deliver": True},
        {"max_ack_pending": 0},
        {"max_member_pending": 0},
        {"start": "earliest"},
        {"backoff": (1, 2)},
    ],
)
async def test_invalid_shared_config_is_refused(engine: Engine, kwargs) -> None:
    await make_stream(engine)
    with pytest.raises(InvalidConfigError):
        SharedGroupConfig("bad", **kwargs)
    assert engine.groups(STREAM) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delays_s": (-1,)},
        {"initial_s": -0.1},
        {"multiplier": 0.5},
        {"max_s": -1},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_invalid_backoff_is_refused(kwargs) -> None:
    with pytest.raises(InvalidConfigError):
        Backoff(**kwargs)


async def test_invalid_group_name_is_refused(engine: Engine) -> None:
    await make_stream(engine)
    for name in ("", "has space", "x" * 65, "a.b"):
        with pytest.raises(InvalidNameError):
            SharedGroupConfig(name)
    assert engine.groups(STREAM) == []


async def test_max_ack_pending_none_is_refused_or_unbounded(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    try:
        config = SharedGroupConfig("unbounded", max_ack_pending=None)  # type: ignore[arg-type]
    except InvalidConfigError:
        return
    group = await engine.shared_group(STREAM, config)
    assert len(await group.member().fetch(10, 0.5)) == 3


async def test_ack_batch_acks_every_delivery(engine: Engine) -> None:
    await make_stream(engine, partitions=2)
    await publish(engine, 6, keyed=True)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=0.2))
    member = group.member()
    await member.ack_batch(await fetch_n(member, 6))
    assert totals(engine, "workers")["lag"] == 0
    assert await member.fetch(10, 0.4) == []


async def test_refused_ack_batch_changes_nothing(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 3)
    group = await engine.shared_group(STREAM, fast(ack_wait_s=10))
    member = group.member()
    d0, d1, d2 = await fetch_n(member, 3)
    await d1.ack()
    before = engine.group_lag(STREAM, "workers")
    with pytest.raises(AlreadySettledError):
        await member.ack_batch([d0, d1, d2])
    assert engine.group_lag(STREAM, "workers") == before
    assert not d0.settled and not d2.settled


async def test_invalid_fetch_arguments_are_refused(engine: Engine) -> None:
    await make_stream(engine)
    group = await engine.shared_group(STREAM, fast())
    member = group.member()
    for max_messages, timeout in [(0, 1), (-1, 1), (1.5, 1), (True, 1), (1, -1), (1, "1")]:
        with pytest.raises(InvalidConfigError):
            await member.fetch(max_messages, timeout)


async def test_same_group_name_with_different_config_is_refused(env: Env) -> None:
    engine = env.engine
    await make_stream(engine)
    await publish(engine, 2)
    config = fast(ack_wait_s=10, max_deliver=3, backoff=Backoff(delays_s=(0.1, 0.2)))
    group = await engine.shared_group(STREAM, config)
    [d] = await group.member().fetch(1, 1)
    for other in (
        fast(ack_wait_s=11, max_deliver=3, backoff=Backoff(delays_s=(0.1, 0.2))),
        fast(ack_wait_s=10, max_deliver=4, backoff=Backoff(delays_s=(0.1, 0.2))),
        fast(ack_wait_s=10, max_deliver=3),
    ):
        with pytest.raises(GroupExistsError):
            await engine.shared_group(STREAM, other)
    with pytest.raises(GroupExistsError):
        await engine.ordered_group(STREAM, OrderedGroupConfig("workers"))
    assert engine.group(STREAM, "workers") is group
    assert group.config == config
    assert engine.groups(STREAM) == ["workers"]
    assert totals(engine, "workers")["in_flight"] == 1
    await d.ack()
    assert await engine.shared_group(STREAM, config) is group
    # The stored configuration survives a reopen and still compares equal.
    engine = await env.reopen()
    assert engine.group(STREAM, "workers").config == config
    assert (await engine.shared_group(STREAM, config)) is engine.group(STREAM, "workers")
    with pytest.raises(GroupExistsError):
        await engine.shared_group(STREAM, fast(ack_wait_s=12))


async def test_delete_group_removes_it_and_its_progress(engine: Engine) -> None:
    await make_stream(engine)
    await publish(engine, 2)
    group = await engine.shared_group(STREAM, fast())
    for d in await fetch_n(group.member(), 2):
        await d.ack()
    await engine.delete_group(STREAM, "workers")
    assert engine.groups(STREAM) == []
    with pytest.raises(GroupNotFoundError):
        engine.group(STREAM, "workers")
    fresh = await engine.shared_group(STREAM, fast())
    assert sorted(payloads(await fetch_n(fresh.member(), 2))) == [0, 1], "a new group starts afresh"


async def test_a_dead_letter_subject_the_engine_refuses_fails_the_group_creation(engine: Engine) -> None:
    """A stream capturing '>' would also capture the dead-letter subject: refuse the group up
    front rather than strand its first failed message."""
    await engine.create_stream(StreamConfig("everything", (">",)))
    with pytest.raises(SubjectOverlapError, match=r"\$DLQ\.everything\.g"):
        await engine.shared_group("everything", SharedGroupConfig("g"))
    assert engine.groups("everything") == []
    group = await engine.shared_group("everything", SharedGroupConfig("g", dead_letter=False))
    assert engine.groups("everything") == ["g"]
    assert group.config.dead_letter is False
