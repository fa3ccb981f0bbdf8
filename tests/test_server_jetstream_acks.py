"""JetStream acks: the ack policies "all" and "none", run with nats-py against the real
``nats-server -js`` and against pigeon's server, comparing what a client observes (what is
delivered, what an ack covers, what comes back, the consumer's counts); and, on pigeon alone,
acks arriving every way a client can send them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import nats.js

import test_server_jetstream_differential_more as differential
from test_server_jetstream import T, client, failure
from test_server_jetstream_differential_more import both, consumer_state, fetched

# The differential tests' fixtures: nats-server (one per module) and pigeon (one per test).
reference = differential.reference
pigeon = differential.pigeon
url = differential.url


@contextlib.asynccontextmanager
async def consumer_on(
    server_url: str, stream: str, messages: int, policy: str, ack_wait: float
) -> AsyncIterator[tuple[nats.js.JetStreamContext, Any, dict[str, Any]]]:
    """A stream holding ``messages`` messages and a pull consumer named after ``policy``: yields
    the JetStream context, the bound subscription and the scenario's record (the policy the
    server reports is in it already); the stream is deleted after."""
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for i in range(messages):
            await js.publish(stream, b"%d" % i)
        info = await js.add_consumer(stream, durable_name=policy, ack_policy=policy, ack_wait=ack_wait)
        out = {"config": info.config.ack_policy}
        yield js, await js.pull_subscribe_bind(policy, stream=stream), out
        await js.delete_stream(stream)


async def ack_all(server_url: str, stream: str) -> dict[str, Any]:
    async with consumer_on(server_url, stream, 8, "all", 2) as (js, sub, out):
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
    return out


async def test_an_ack_covers_every_message_delivered_before_it(reference: str, url: str) -> None:
    out = await both(reference, url, ack_all)
    assert out["first"] == [b"0", b"1", b"2", b"3", b"4"]
    assert out["after acking the third"][1] == 2  # two left pending of five
    assert out["after acking the fifth"][1] == 0 and out["rest"] == [(b"5", 1), (b"6", 1), (b"7", 1)]
    assert out["end"][:2] == (0, 0)


async def ack_none(server_url: str, stream: str) -> dict[str, Any]:
    async with consumer_on(server_url, stream, 5, "none", 0.5) as (js, sub, out):
        msgs = await sub.fetch(3, timeout=T)
        out["fetched"] = [(m.data, m.metadata.sequence.stream, m.metadata.num_delivered) for m in msgs]
        out["state"] = consumer_state(await js.consumer_info(stream, "none"))
        await msgs[0].nak()  # nothing to take back: it was done when it was sent
        rest = await fetched(sub, 10, 1.5)  # longer than ack_wait: nothing is redelivered
        out["rest"] = [(m.data, m.metadata.num_delivered) for m in rest]
        out["end"] = consumer_state(await js.consumer_info(stream, "none"))
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


async def delivered(js: nats.js.JetStreamContext, stream: str, policy: str, count: int) -> list[Any]:
    """A new stream of ``count + 1`` messages and a consumer "c" with ack ``policy``; the first
    ``count`` messages fetched by it."""
    await js.add_stream(name=stream, subjects=[stream])
    for i in range(count + 1):
        await js.publish(stream, b"%d" % i)
    await js.add_consumer(stream, durable_name="c", ack_policy=policy)
    msgs: list[Any] = await (await js.pull_subscribe_bind("c", stream=stream)).fetch(count, timeout=T)
    return msgs


async def test_acks_count_however_they_come(url: str) -> None:
    async with client(url) as nc, client(url) as watcher_nc:
        js = nc.jetstream(timeout=T)
        msgs = await delivered(js, "ways", "explicit", 5)
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


async def test_an_ack_all_after_a_restart_covers_what_was_delivered_before(pigeon: Any) -> None:
    async with client(pigeon.server.url) as nc:
        msgs = await delivered(nc.jetstream(timeout=T), "again", "all", 3)
    await pigeon.stop()  # the three leases are gone; the group still counts them unfinished
    url = await pigeon.start()
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await nc.request(msgs[2].reply, b"+ACK", timeout=T)  # what ack_sync sends
        info = await js.consumer_info("again", "c")
        assert (info.num_ack_pending, info.ack_floor.stream_seq) == (0, 3)
        rest = await fetched(await js.pull_subscribe_bind("c", stream="again"), 10, 0.5)
        assert [m.data for m in rest] == [b"3"], "nothing before the ack comes again"
