"""The in-process bus behind memory:// and file:// core messaging, and URL dispatch."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

import pigeon.transport as transports
from pigeon.errors import (
    InvalidConfigError,
    InvalidSubjectError,
    MissingExtraError,
    NoRespondersError,
    TransportClosedError,
    UnknownSchemeError,
)
from pigeon.message import Headers, Message
from pigeon.transport import connect
from pigeon.transport.bus import Bus, BusOptions
from pigeon.transport.embedded import EmbeddedOptions, EmbeddedTransport
from pigeon.transport.memory import MemoryOptions, MemoryTransport


async def fill(bus: Bus, subject: str, n: int) -> None:
    for i in range(n):
        await bus.publish(Message(subject, str(i).encode()))


async def drain(subscription: object) -> list[bytes]:
    out = []
    while True:
        try:
            out.append((await subscription.next(0.05)).payload)  # type: ignore[attr-defined]
        except TimeoutError:
            return out


async def test_drop_oldest_keeps_the_newest_and_counts_every_drop(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus(BusOptions(buffer_size=3, overflow="drop_oldest"))
    slow = bus.subscribe("a.b")
    with caplog.at_level(logging.WARNING, logger="pigeon.transport.bus"):
        await fill(bus, "a.b", 5)
    assert await drain(slow) == [b"2", b"3", b"4"]
    assert slow.dropped == 2 and bus.dropped == 2
    assert len([r for r in caplog.records if "slow subscriber" in r.message]) == 2


async def test_drop_newest_keeps_the_oldest() -> None:
    bus = Bus(BusOptions(buffer_size=3, overflow="drop_newest"))
    slow = bus.subscribe("a.b")
    await fill(bus, "a.b", 5)
    assert await drain(slow) == [b"0", b"1", b"2"]
    assert slow.dropped == 2


async def test_block_waits_for_room_then_drops_after_its_timeout() -> None:
    bus = Bus(BusOptions(buffer_size=1, overflow="block", block_timeout_s=0.2))
    slow = bus.subscribe("a.b")
    await fill(bus, "a.b", 1)

    async def reader() -> bytes:
        await asyncio.sleep(0.05)
        return (await slow.next(1)).payload

    task = asyncio.create_task(reader())
    started = time.monotonic()
    await bus.publish(Message("a.b", b"second"))  # waits until the reader makes room
    assert time.monotonic() - started >= 0.04
    assert await task == b"0"
    started = time.monotonic()
    await bus.publish(Message("a.b", b"third"))  # nobody reads: waits out the timeout, drops
    assert time.monotonic() - started >= 0.19
    assert slow.dropped == 1
    assert await drain(slow) == [b"second"]


async def test_a_slow_subscriber_does_not_hold_back_a_fast_one() -> None:
    bus = Bus(BusOptions(buffer_size=10, overflow="drop_oldest"))
    slow = bus.subscribe("a.*")
    fast = bus.subscribe("a.b")
    received = []

    async def keep_up() -> None:
        for _ in range(100):
            received.append((await fast.next(1)).payload)

    task = asyncio.create_task(keep_up())
    for i in range(100):
        await bus.publish(Message("a.b", str(i).encode()))
        await asyncio.sleep(0)
    await task
    assert received == [str(i).encode() for i in range(100)]
    assert slow.dropped == 90 and fast.dropped == 0


async def test_queue_groups_take_turns_and_plain_subscribers_get_everything() -> None:
    bus = Bus()
    workers = [bus.subscribe("jobs.*", queue="w") for _ in range(3)]
    audit = bus.subscribe("jobs.>")
    for i in range(9):
        assert await bus.publish(Message("jobs.x", str(i).encode())) == 2
    assert [len(await drain(w)) for w in workers] == [3, 3, 3]
    assert len(await drain(audit)) == 9


async def test_unsubscribed_and_closed() -> None:
    bus = Bus()
    subscription = bus.subscribe("a")
    await subscription.unsubscribe()
    assert await bus.publish(Message("a", b"x")) == 0
    with pytest.raises(TransportClosedError):
        await subscription.next(0.1)
    await bus.close()
    with pytest.raises(TransportClosedError):
        await bus.publish(Message("a", b"x"))
    with pytest.raises(TransportClosedError):
        bus.subscribe("a")


async def test_request_sets_the_reply_subject_and_reports_no_responders() -> None:
    bus = Bus()
    with pytest.raises(NoRespondersError, match=r"svc\.none"):
        await bus.request("svc.none", b"", None, 1)
    service = bus.subscribe("svc.echo")

    async def answer() -> None:
        request = await service.next(1)
        await bus.publish(Message(request.headers[Headers.REPLY_TO], request.payload * 2))

    task = asyncio.create_task(answer())
    assert (await bus.request("svc.echo", b"ab", None, 1)).payload == b"abab"
    await task


@pytest.mark.parametrize(
    "options",
    [
        {"buffer_size": 0},
        {"buffer_size": True},
        {"overflow": "explode"},
        {"block_timeout_s": -1},
    ],
)
def test_bad_bus_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        BusOptions(**options)  # type: ignore[arg-type]


async def test_bad_subjects_and_queue_names_are_refused() -> None:
    bus = Bus()
    with pytest.raises(InvalidSubjectError):
        bus.subscribe("a..b")
    with pytest.raises(InvalidConfigError):
        bus.subscribe("a", queue="has space")
    with pytest.raises(InvalidSubjectError):
        await bus.publish(Message("a.*", b""))


async def test_connect_picks_the_transport_by_scheme(tmp_path: Path) -> None:
    memory = await connect("memory://", MemoryOptions(bus=BusOptions(buffer_size=5)))
    assert isinstance(memory, MemoryTransport) and not memory.capabilities.durable
    folder = memory._folder
    await memory.close()
    assert not await asyncio.to_thread(Path(folder).exists), "memory:// leaves nothing behind"
    embedded = await connect(f"file://{tmp_path / 'data'}", EmbeddedOptions(durability="always"))
    assert isinstance(embedded, EmbeddedTransport) and embedded.capabilities.durable
    await embedded.close()
    assert await asyncio.to_thread((tmp_path / "data" / "LOCK").exists)


async def test_unknown_scheme_and_wrong_options_are_clear_errors() -> None:
    with pytest.raises(UnknownSchemeError, match="kafka"):
        await connect("kafka://localhost:9092")
    with pytest.raises(InvalidConfigError, match="MemoryOptions"):
        await connect("memory://", EmbeddedOptions())


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scheme whose client library is not installed: the error says which extra brings it.
    monkeypatch.setitem(
        transports._TRANSPORTS, "mq", ("memory", "MemoryTransport", "mq", "pigeon_no_such_client")
    )
    with pytest.raises(MissingExtraError, match=r"pip install 'pigeon\[mq\]'"):
        transports.transport_class("mq://host")
