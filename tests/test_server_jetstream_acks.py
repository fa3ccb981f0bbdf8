"""JetStream acks: the ack policies "all" and "none", run with nats-py against the real
``nats-server -js`` and against pigeon's server, comparing what a client observes (what is
delivered, what an ack covers, what comes back, the consumer's counts); and, on pigeon alone,
acks arriving every way a client can send them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from test_server_jetstream import Pigeon, T, client, failure, run_reference
from test_server_jetstream_differential_more import both, consumer_state, fetched


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_reference(tmp_path_factory.mktemp("js")) as url:
        yield url


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    instance = Pigeon(tmp_path / "data")
    await instance.start()
    try:
        assert instance.server is not None
        yield instance.server.url
    finally:
        await instance.stop()


async def ack_all(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for i in range(8):
            await js.publish(stream, b"%d" % i)
        info = await js.add_consumer(stream, durable_name="all", ack_policy="all", ack_wait=2)
        out["config"] = info.config.ack_policy
        sub = await js.pull_subscribe_bind("all", stream=stream)
        first = await sub.fetch(5, timeout=T)
        out["first"] = [m.data for m in first]
        await first[2].ack_sync(timeout=T)  # covers the two before it
        out["after acking the third"] = consumer_state(await js.consumer_info(stream, "all"))
        await first[3].nak()
        await first[4].ack_sync(timeout=T)  # covers the nacked one too
        out["after acking the fifth"] = consumer_state(await js.consumer_info(stream, "all"))
        rest = await fetched(sub, 10, 1.0)
        out["rest"] = [(m.data, m.metadata.num_delivered) for m in rest]
        await rest[-1].ack_sync(timeout=T)
        out["end"] = consumer_state(await js.consumer_info(stream, "all"))
        again = await js.add_consumer(stream, durable_name="all", ack_policy="all", ack_wait=2)
        out["same config again"] = again.config.ack_policy
        out["policy changed"] = await failure(
            js.add_consumer(stream, durable_name="all", ack_policy="explicit", ack_wait=2)
        )
        await js.delete_stream(stream)
    return out


async def test_an_ack_covers_every_message_delivered_before_it(reference: str, url: str) -> None:
    out = await both(reference, url, ack_all)
    assert out["first"] == [b"0", b"1", b"2", b"3", b"4"]
    assert out["after acking the third"][1] == 2  # two left pending of five
    assert out["after acking the fifth"][1] == 0 and out["rest"] == [(b"5", 1), (b"6", 1), (b"7", 1)]
    assert out["end"][:2] == (0, 0)


async def ack_none(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for i in range(5):
            await js.publish(stream, b"%d" % i)
        info = await js.add_consumer(stream, durable_name="none", ack_policy="none", ack_wait=0.5)
        out["config"] = info.config.ack_policy
        sub = await js.pull_subscribe_bind("none", stream=stream)
        msgs = await sub.fetch(3, timeout=T)
        out["fetched"] = [(m.data, m.metadata.sequence.stream, m.metadata.num_delivered) for m in msgs]
        out["state"] = consumer_state(await js.consumer_info(stream, "none"))
        await msgs[0].nak()  # nothing to take back: it was done when it was sent
        rest = await fetched(sub, 10, 1.5)  # longer than ack_wait: nothing is redelivered
        out["rest"] = [(m.data, m.metadata.num_delivered) for m in rest]
        out["end"] = consumer_state(await js.consumer_info(stream, "none"))
        await js.delete_stream(stream)
    return out


async def test_with_ack_policy_none_a_message_is_done_once_sent(reference: str, url: str) -> None:
    out = await both(reference, url, ack_none)
    assert out["state"][:2] == (2, 0)
    assert out["rest"] == [(b"3", 1), (b"4", 1)] and out["end"][:3] == (0, 0, 0)


async def test_an_unknown_ack_policy_is_refused(url: str) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="ap", subjects=["ap"])
        refused = await failure(js.add_consumer("ap", durable_name="c", ack_policy="sometimes"))
        assert refused[:2] == (400, 10003) and "ack_policy" in refused[2]


async def raw_ack(url: str, connect: str, frame: bytes, answer: bytes) -> None:
    """Send ``frame`` on a fresh connection opened with ``connect``; expect ``answer`` back."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await asyncio.wait_for(reader.readline(), T)  # INFO
        writer.write(b"CONNECT " + connect.encode() + b"\r\n" + frame + b"PING\r\n")
        got = await asyncio.wait_for(reader.readuntil(b"PONG\r\n"), T)
        assert got == answer + b"PONG\r\n"
    finally:
        writer.close()


async def test_acks_count_however_they_come(url: str) -> None:
    async with client(url) as nc, client(url) as watcher_nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="ways", subjects=["ways"])
        for i in range(5):
            await js.publish("ways", b"%d" % i)
        await js.add_consumer("ways", durable_name="c", ack_policy="explicit")
        msgs = await (await js.pull_subscribe_bind("c", stream="ways")).fetch(5, timeout=T)
        # A verbose client is answered +OK per operation; a pedantic one sends headers too.
        reply = [m.reply.encode() for m in msgs]
        await raw_ack(url, '{"verbose":true}', b"PUB %b 0\r\n\r\n" % reply[0], b"+OK\r\n+OK\r\n")
        header = b"NATS/1.0\r\nX: y\r\n\r\n"
        frame = b"HPUB %b %d %d\r\n%b+ACK\r\n" % (reply[1], len(header), len(header) + 4, header)
        await raw_ack(url, '{"verbose":false,"pedantic":true,"headers":true}', frame, b"")
        # While a client watches the ack subjects, they are routed to it and still applied.
        seen: list[str] = []

        async def watch(msg: Any) -> None:
            seen.append(msg.subject)

        watcher = await watcher_nc.subscribe("$JS.ACK.ways.>", cb=watch)
        await watcher_nc.flush(T)
        await msgs[2].ack()
        await nc.flush(T)
        await watcher.unsubscribe()
        await watcher_nc.flush(T)
        await msgs[3].ack()
        await msgs[4].ack()
        deadline = time.monotonic() + T
        while (info := await js.consumer_info("ways", "c")).num_ack_pending:
            assert time.monotonic() < deadline, f"{info.num_ack_pending} acks not applied"
            await asyncio.sleep(0.02)
        assert (info.ack_floor.stream_seq, seen) == (5, [msgs[2].reply])
