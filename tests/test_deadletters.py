"""Dead-letter management (list, redrive, purge, auto_redrive) on every transport."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from pigeon.errors import InvalidConfigError, InvalidNameError, StreamNotFoundError
from pigeon.message import Headers, Message
from pigeon.patterns.deadletters import DeadLetter, DeadLetters, RedriveReport
from pigeon.testing.services import unique_name
from pigeon.transport import ConsumerSpec, Received, Transport

# Where a dead letter says the original failed and was stored: never on a redriven copy.
FAILURE_HEADERS = (
    Headers.ERROR_TYPE,
    Headers.ERROR_MESSAGE,
    Headers.FAILURE_REASON,
    Headers.FIRST_FAILURE_AT,
    Headers.LAST_FAILURE_AT,
    Headers.GROUP,
    Headers.ORIGINAL_STREAM,
    Headers.ORIGINAL_PARTITION,
    Headers.ORIGINAL_OFFSET,
    Headers.DELIVERY_COUNT,
)
# Short: every box operation ends with a quiet period this long in which no letter came.
QUIET_S = 0.05


async def fetch(consumer: Any, n: int, timeout: float = 10.0) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += await consumer.fetch(n - len(got), 0.5)
    assert len(got) == n, f"expected {n} messages, got {len(got)}"
    return got


async def nothing_more(consumer: Any) -> None:
    extra = await consumer.fetch(10, 0.25)
    assert not extra, [r.message.payload for r in extra]


@dataclass
class Env:
    transport: Transport
    stream: str
    prefix: str
    group: str
    consumer: Any
    box: DeadLetters
    originals: dict[bytes, Message] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"{self.prefix}.orders"

    async def publish(self, *payloads: bytes) -> list[Received]:
        for payload in payloads:
            await self.transport.publish(
                self.subject, payload, key=payload.decode(), headers={"X-Trace": "t1"}
            )
        received = await fetch(self.consumer, len(payloads))
        for r in received:
            self.originals[r.message.payload] = r.message
        return sorted(received, key=lambda r: payloads.index(r.message.payload))

    async def kill(self, *payloads: bytes, error: Callable[[str], BaseException] = ValueError) -> None:
        """Publish the payloads, then dead-letter them in the order given."""
        for r in await self.publish(*payloads):
            await r.term(error(f"bad {r.message.payload.decode()}"))


@pytest.fixture
async def env(any_transport: Transport, make_stream: Any) -> AsyncIterator[Env]:
    stream, prefix = await make_stream()
    group = unique_name("g")
    consumer = await any_transport.consumer(stream, ConsumerSpec(group, kind="shared", ack_wait_s=5))
    box = DeadLetters(any_transport, stream, group, quiet_s=QUIET_S)
    try:
        yield Env(any_transport, stream, prefix, group, consumer, box)
    finally:
        await box.close()
        await consumer.close()
        # The embedded engine keeps a group's dead-letter stream when its stream is deleted.
        with contextlib.suppress(StreamNotFoundError):
            await any_transport.delete_stream(box.dead_letter_stream)


def payloads(letters: list[DeadLetter]) -> list[bytes]:
    return [letter.message.payload for letter in letters]


async def test_list_shows_the_dead_letters_oldest_first_and_leaves_them(env: Env) -> None:
    started = datetime.now(UTC)
    received = await env.publish(b"m0", b"m1", b"m2", b"m3")
    await received[3].ack()
    for i in (2, 0, 1):  # dead-lettered in this order
        await received[i].term(ValueError(f"bad m{i}"))

    letters = await env.box.list()

    assert payloads(letters) == [b"m2", b"m0", b"m1"]
    for letter in letters:
        original = env.originals[letter.message.payload]
        assert letter.id == f"{original.id}:0"
        assert letter.original_msg_id == original.id
        assert letter.original_subject == env.subject
        assert letter.message.key == original.key
        assert letter.message.headers["X-Trace"] == "t1"
        assert letter.message.headers[Headers.GROUP] == env.group
        assert (letter.error_type, letter.error_message) == ("ValueError", f"bad {original.payload.decode()}")
        assert letter.failed_at is not None and started <= letter.failed_at <= datetime.now(UTC)
        assert letter.redrive_count == 0
        assert 0 <= letter.age_s < 30
    assert [x.id for x in await env.box.list()] == [x.id for x in letters]
    assert payloads(await env.box.list(limit=2)) == [b"m2", b"m0"]
    assert await env.box.count() == 3


async def test_redrive_by_id_sends_a_fresh_copy_to_the_group_only(env: Env) -> None:
    await env.kill(b"m0", b"m1", b"m2")
    target = (await env.box.list())[1]
    original = env.originals[b"m1"]

    assert await env.box.redrive([target.id]) == 1

    (again,) = await fetch(env.consumer, 1)
    copy = again.message
    assert (copy.subject, copy.payload, copy.key) == (env.subject, b"m1", "m1")
    assert again.delivery_count == 1
    assert copy.headers[Headers.REDRIVE_COUNT] == "1"
    assert copy.headers[Headers.REDRIVE_FOR] == env.group
    assert copy.headers[Headers.ORIGINAL_MSG_ID] == original.id
    assert copy.headers["X-Trace"] == "t1"
    assert copy.id != original.id
    assert not [h for h in FAILURE_HEADERS if h in copy.headers]
    await again.ack()
    assert payloads(await env.box.list()) == [b"m0", b"m2"]
    assert await env.box.redrive([target.id]) == 0  # gone from the box: not sent twice
    await nothing_more(env.consumer)


async def test_redrive_by_filter_and_all(env: Env) -> None:
    await env.kill(b"m0", b"m2")
    await env.kill(b"m1", b"m3", error=TypeError)

    assert await env.box.redrive(where=lambda letter: letter.error_type == "TypeError") == 2
    back = await fetch(env.consumer, 2)
    assert sorted(r.message.payload for r in back) == [b"m1", b"m3"]
    for r in back:
        await r.ack()
    assert payloads(await env.box.list()) == [b"m0", b"m2"]

    assert await env.box.redrive(all=True) == 2
    back = await fetch(env.consumer, 2)
    assert sorted(r.message.payload for r in back) == [b"m0", b"m2"]
    for r in back:
        await r.ack()
    assert await env.box.list() == []
    assert await env.box.redrive(all=True) == 0
    await nothing_more(env.consumer)


async def test_purge_by_id_and_all(env: Env) -> None:
    await env.kill(b"m0", b"m1", b"m2")
    first = (await env.box.list())[0]

    assert await env.box.purge([first.id, "not-a-letter"]) == 1
    assert payloads(await env.box.list()) == [b"m1", b"m2"]
    assert await env.box.purge(all=True) == 2
    assert await env.box.list() == []
    assert await env.box.count() == 0
    await nothing_more(env.consumer)  # purged, not redriven


async def test_auto_redrive_parks_a_poison_message_after_max_redrives(env: Env) -> None:
    await env.kill(b"poison")
    original = env.originals[b"poison"]

    for redrives in (1, 2):
        assert await env.box.auto_redrive(min_age_s=0, max_redrives=2) == RedriveReport(redriven=1, parked=0)
        (again,) = await fetch(env.consumer, 1)
        assert again.message.headers[Headers.REDRIVE_COUNT] == str(redrives)
        assert again.delivery_count == 1
        await again.term(RuntimeError("still bad"))

    for _ in range(2):  # parked for good: every pass leaves it
        assert await env.box.auto_redrive(min_age_s=0, max_redrives=2) == RedriveReport(redriven=0, parked=1)
    (letter,) = await env.box.list()
    assert letter.redrive_count == 2
    assert letter.id == f"{original.id}:2"
    assert letter.original_msg_id == original.id
    assert letter.original_subject == env.subject
    assert (letter.error_type, letter.error_message) == ("RuntimeError", "still bad")
    await nothing_more(env.consumer)

    # A person can still send it back by hand.
    assert await env.box.redrive([letter.id]) == 1
    (again,) = await fetch(env.consumer, 1)
    assert again.message.headers[Headers.REDRIVE_COUNT] == "3"
    await again.ack()


async def test_auto_redrive_leaves_letters_younger_than_min_age(env: Env) -> None:
    await env.kill(b"old")
    assert payloads(await env.box.list()) == [b"old"]  # the admin group exists: the next pass is quick
    await asyncio.sleep(1.0)
    await env.kill(b"young")

    assert await env.box.auto_redrive(min_age_s=0.5, max_redrives=3) == RedriveReport(redriven=1, parked=0)

    (back,) = await fetch(env.consumer, 1)
    assert back.message.payload == b"old"
    await back.ack()
    assert payloads(await env.box.list()) == [b"young"]
    await nothing_more(env.consumer)


async def test_every_dead_letters_sees_the_whole_box_between_calls(env: Env) -> None:
    """A service's auto-redrive and an operator's tool open the same box: neither hides
    letters from the other between calls, and a fresh one (each command of a command-line
    tool) sees them all too."""
    await env.kill(b"m0", b"m1", b"m2")
    service = env.box
    for _ in range(3):
        tool = DeadLetters(env.transport, env.stream, env.group, quiet_s=QUIET_S)
        try:
            assert payloads(await service.list()) == [b"m0", b"m1", b"m2"]
            assert payloads(await tool.list()) == [b"m0", b"m1", b"m2"]
        finally:
            await tool.close()


async def test_two_groups_redriving_one_message_each_get_their_copy(env: Env) -> None:
    other_group = unique_name("g")
    other = await env.transport.consumer(env.stream, ConsumerSpec(other_group, kind="shared", ack_wait_s=5))
    other_box = DeadLetters(env.transport, env.stream, other_group, quiet_s=QUIET_S)
    try:
        await env.kill(b"m0")
        (mine,) = await fetch(other, 1)
        await mine.term("also bad")

        assert await env.box.redrive(all=True) == 1
        assert await other_box.redrive(all=True) == 1

        # Both copies reach every group; each says which group it is for.
        for consumer in (env.consumer, other):
            copies = await fetch(consumer, 2)
            assert sorted(r.message.headers[Headers.REDRIVE_FOR] for r in copies) == sorted(
                [env.group, other_group]
            )
            for r in copies:
                await r.ack()
    finally:
        await other_box.close()
        await other.close()
        with contextlib.suppress(StreamNotFoundError):
            await env.transport.delete_stream(other_box.dead_letter_stream)


async def test_an_empty_box(env: Env) -> None:
    (fine,) = await env.publish(b"fine")
    await fine.ack()
    assert await env.box.list() == []
    assert await env.box.count() == 0
    assert await env.box.redrive(all=True) == 0
    assert await env.box.purge(all=True) == 0
    assert await env.box.auto_redrive(min_age_s=0, max_redrives=1) == RedriveReport(0, 0)

    # Letters written after the first look (NATS and Redis create the stream only now) show up.
    await env.kill(b"late")
    assert payloads(await env.box.list()) == [b"late"]


async def test_a_group_without_a_dead_letter_stream_has_an_empty_box(env: Env) -> None:
    box = DeadLetters(env.transport, env.stream, unique_name("g"), quiet_s=QUIET_S)
    try:
        with pytest.raises(StreamNotFoundError):
            await env.transport.stream_state(box.dead_letter_stream)
        assert await box.list() == []
        assert await box.count() == 0
        assert await box.redrive(all=True) == 0
        assert await box.auto_redrive(min_age_s=0, max_redrives=1) == RedriveReport(0, 0)
        with pytest.raises(StreamNotFoundError):  # looking did not create it
            await env.transport.stream_state(box.dead_letter_stream)
    finally:
        await box.close()

    missing = DeadLetters(env.transport, unique_name("s"), env.group, quiet_s=QUIET_S)
    with pytest.raises(StreamNotFoundError):
        await missing.list()


async def test_bad_arguments_raise_and_leave_the_box_alone(env: Env) -> None:
    await env.kill(b"m0")
    letter_id = (await env.box.list())[0].id
    box = env.box
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: box.redrive(),
        lambda: box.redrive([letter_id], all=True),
        lambda: box.redrive(where=lambda _: True, all=True),
        lambda: box.redrive([letter_id], where=lambda _: True),
        lambda: box.redrive(letter_id),  # one id must still be a collection
        lambda: box.redrive(where="m0"),  # type: ignore[arg-type]
        lambda: box.purge(),
        lambda: box.purge([letter_id], all=True),
        lambda: box.list(limit=0),
        lambda: box.auto_redrive(min_age_s=-1, max_redrives=1),
        lambda: box.auto_redrive(min_age_s=0, max_redrives=-1),
    ]
    for call in calls:
        with pytest.raises(InvalidConfigError):
            await call()
    with pytest.raises(InvalidConfigError):
        DeadLetters(env.transport, env.stream, env.group, quiet_s=0)
    with pytest.raises(InvalidNameError):
        DeadLetters(env.transport, env.stream, "bad group!")
    with pytest.raises(InvalidNameError):  # the dead-letter stream's name would be too long
        DeadLetters(env.transport, env.stream, "g" * 60)
    assert [x.id for x in await box.list()] == [letter_id]
    await nothing_more(env.consumer)
