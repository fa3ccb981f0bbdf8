"""JetStream through nats-py, on pigeon serve and on the reference nats-server alike.

Both servers are started by the harness on a free port with a fresh storage folder, and are
driven by the same code: the only difference between the two columns is the server.
Publishes: ``js.publish`` (awaits the PubAck) and ``js.publish_async`` (then every PubAck).
Consumes: a durable pull consumer, ``msg.ack()`` on each message (explicit acks), or
``AckPolicy.ALL`` acknowledging the last message of each fetched batch. Acks are sent without
a reply, so a consume run ends when the server reports no acks pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from ..servers import free_port, nats_server_binary, running
from .base import Core, Durable, Kind, OnPayload, System, Unreachable, Where, fresh_name

_WAIT_S = 30
_EXPLICIT_FETCH = 500
_BATCH_FETCH = 1000
_PENDING = 1_000_000  # messages a subscription may buffer: nothing is dropped for being slow


async def _connect(url: str) -> Client:
    try:
        return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, pending_size=64 << 20)
    except Exception as error:
        raise Unreachable(f"cannot connect to {url}: {error}") from error


class _Stream(Durable):
    def __init__(self, nc: Client, name: str) -> None:
        self.js = nc.jetstream(timeout=_WAIT_S)
        self.name = name
        self.subject = f"{name}.m"

    async def publish(self, payload: bytes) -> None:
        await self.js.publish(self.subject, payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        acks = [await self.js.publish_async(self.subject, payload) for payload in payloads]
        await asyncio.gather(*acks)

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        await self._consume(count, on_payload, AckPolicy.EXPLICIT, _EXPLICIT_FETCH)

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        await self._consume(count, on_payload, AckPolicy.ALL, _BATCH_FETCH)

    async def _consume(self, count: int, on_payload: OnPayload, policy: AckPolicy, fetch: int) -> None:
        durable = fresh_name("c")
        await self.js.add_consumer(self.name, ConsumerConfig(durable_name=durable, ack_policy=policy))
        subscription = await self.js.pull_subscribe_bind(durable, self.name)
        seen = 0
        while seen < count:
            try:
                messages = await subscription.fetch(min(fetch, count - seen), timeout=5.0)
            except TimeoutError:
                continue
            for msg in messages:
                on_payload(msg.data)
                if policy is AckPolicy.EXPLICIT:
                    await msg.ack()
            if policy is AckPolicy.ALL:
                await messages[-1].ack()
            seen += len(messages)
        await subscription.unsubscribe()
        await self._acks_applied(durable)

    async def _acks_applied(self, durable: str) -> None:
        for _ in range(int(_WAIT_S / 0.01)):
            if not (await self.js.consumer_info(self.name, durable)).num_ack_pending:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError(f"acks still pending on consumer {durable} after {_WAIT_S:.0f} s")


class _Core(Core):
    def __init__(self, publisher: Client, subscriber: Client, subject: str) -> None:
        self.publisher, self.subscriber = publisher, subscriber
        self.subject = subject
        self.subscriptions: list[Any] = []

    async def subscribe(self, on_payload: OnPayload) -> None:
        async def deliver(msg: Msg) -> None:
            on_payload(msg.data)

        await self._on(self.subject, deliver)

    async def publish(self, payload: bytes) -> None:
        await self.publisher.publish(self.subject, payload)

    async def flush(self) -> None:
        await self.publisher.flush(_WAIT_S)

    async def serve_echo(self) -> None:
        async def answer(msg: Msg) -> None:
            await msg.respond(msg.data)

        await self._on(f"{self.subject}.rpc", answer)

    async def request(self, payload: bytes) -> bytes:
        return (await self.publisher.request(f"{self.subject}.rpc", payload, timeout=_WAIT_S)).data

    async def _on(self, subject: str, callback: Any) -> None:
        self.subscriptions.append(
            await self.subscriber.subscribe(subject, cb=callback, pending_msgs_limit=_PENDING)
        )
        await self.subscriber.flush(_WAIT_S)  # the server knows the subscription before we publish


class _JetStream(System):
    kind: ClassVar[Kind] = "networked"
    backlog_rss = "server"

    async def open(self) -> None:
        self.publisher = await _connect(self.where.address)
        self.subscriber = await _connect(self.where.address)

    async def close(self) -> None:
        await self.publisher.close()
        await self.subscriber.close()

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        name = fresh_name()
        js = self.publisher.jetstream(timeout=_WAIT_S)
        await js.add_stream(name=name, subjects=[f"{name}.m"])
        try:
            yield _Stream(self.publisher, name)
        finally:
            await js.delete_stream(name)

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        core = _Core(self.publisher, self.subscriber, fresh_name("core"))
        try:
            yield core
        finally:
            for subscription in core.subscriptions:
                await subscription.unsubscribe()


class PigeonServe(_JetStream):
    name = "pigeon_serve"
    title = "pigeon serve (nats-py, JetStream API)"
    kind = "pigeon"
    serve_options: tuple[str, ...] = ()

    @classmethod
    @contextlib.asynccontextmanager
    async def provision(cls, scratch: Path) -> AsyncIterator[Where]:
        port = free_port()
        data = scratch / cls.name
        command = [sys.executable, "-m", "pigeon.cli", "serve", "--data", str(data), *cls.serve_options]
        async with running([*command, "--port", str(port), "--http-port", "0"], port) as where:
            yield where


class PigeonServeBusyPoll(PigeonServe):
    """pigeon serve polling 500 µs before it sleeps: what a latency-tuned deployment gets."""

    name = "pigeon_serve_busy_poll"
    title = "pigeon serve --busy-poll 500 (nats-py, JetStream API)"
    serve_options = ("--busy-poll", "500")


class NatsJetStream(_JetStream):
    name = "nats_jetstream"
    title = "NATS JetStream (nats-server, nats-py)"

    @classmethod
    @contextlib.asynccontextmanager
    async def provision(cls, scratch: Path) -> AsyncIterator[Where]:
        port = free_port()
        command = [nats_server_binary(), "-js", "-sd", str(scratch / cls.name), "-a", "127.0.0.1"]
        async with running([*command, "-p", str(port)], port) as where:
            yield where
