"""pigeon's engine in this process (``file://`` transport, durability "interval").

Durable work goes straight to the engine: ``publish``, ``publish_many``, a shared group acked
per delivery, an ordered group committed per fetched batch with ``ack_batch``. Core messaging
is the transport's in-process bus, set to block rather than drop when a subscriber falls behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from ...engine import OrderedGroupConfig, SharedGroupConfig
from ...transport.base import StreamSpec, Subscription
from ...transport.bus import BusOptions
from ...transport.embedded import EmbeddedOptions, EmbeddedTransport
from .base import Background, Core, Durable, OnPayload, System, fresh_name

_SHARED_FETCH = 500
_ORDERED_FETCH = 1000
_MAX_ACK_PENDING = 10_000
_WAIT_S = 5.0


class _Stream(Durable):
    def __init__(self, transport: EmbeddedTransport, name: str) -> None:
        self.engine = transport.engine
        self.name = name
        self.subject = f"{name}.m"

    async def publish(self, payload: bytes) -> None:
        await self.engine.publish(self.subject, payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        await self.engine.publish_many(self.subject, payloads)

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        group = await self.engine.shared_group(
            self.name, SharedGroupConfig(fresh_name("g"), max_ack_pending=_MAX_ACK_PENDING)
        )
        member = group.member()
        seen = 0
        while seen < count:
            for delivery in await member.fetch(_SHARED_FETCH, _WAIT_S):
                on_payload(delivery.message.payload)
                await delivery.ack()
                seen += 1

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        group = await self.engine.ordered_group(
            self.name, OrderedGroupConfig(fresh_name("g"), commit="batch")
        )
        member = await group.join()
        try:
            seen = 0
            while seen < count:
                deliveries = await member.fetch(_ORDERED_FETCH, _WAIT_S)
                for delivery in deliveries:
                    on_payload(delivery.message.payload)
                await member.ack_batch(deliveries)
                seen += len(deliveries)
        finally:
            await member.leave()


class _Bus(Core):
    def __init__(self, transport: EmbeddedTransport, subject: str) -> None:
        self.transport = transport
        self.subject = subject
        self.background = Background()

    async def subscribe(self, on_payload: OnPayload) -> None:
        subscription = await self.transport.subscribe(self.subject)

        async def deliver() -> None:
            while True:
                on_payload((await subscription.next()).payload)

        self.background.start(deliver())

    async def publish(self, payload: bytes) -> None:
        await self.transport.publish(self.subject, payload)

    async def serve_echo(self) -> None:
        requests: Subscription = await self.transport.subscribe(f"{self.subject}.rpc")

        async def answer() -> None:
            while True:
                request = await requests.next()
                await self.transport.reply(request, request.payload)

        self.background.start(answer())

    async def request(self, payload: bytes) -> bytes:
        return (await self.transport.request(f"{self.subject}.rpc", payload, timeout=_WAIT_S)).payload


class PigeonEmbedded(System):
    name = "pigeon_embedded"
    title = "pigeon embedded (in-process engine)"
    kind = "pigeon"

    async def open(self) -> None:
        options = EmbeddedOptions(bus=BusOptions(overflow="block"))
        self.transport = await EmbeddedTransport.open(f"file://{self.where.address}", options)

    async def close(self) -> None:
        await self.transport.close()

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        name = fresh_name()
        await self.transport.create_stream(StreamSpec(name, (f"{name}.>",)))
        try:
            yield _Stream(self.transport, name)
        finally:
            await self.transport.delete_stream(name)

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        bus = _Bus(self.transport, fresh_name("core"))
        try:
            yield bus
        finally:
            await bus.background.cancel()
