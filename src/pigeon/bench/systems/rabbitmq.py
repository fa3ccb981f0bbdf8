"""RabbitMQ through aio-pika, on the machine's broker, with publisher confirms.

A durable queue per run; persistent messages on a confirming channel, each publish awaited
(the confirm) or 1000 gathered in flight. Consumers use a channel with a prefetch, ``ack()``
each message or ``ack(multiple=True)`` once per batch (one consumer keeps the queue's order).
Core pub/sub is a transient fanout exchange published to without confirms; request-reply is
the RPC pattern of RabbitMQ's tutorial (a reply queue and correlation ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from .base import Core, Durable, OnPayload, System, Unreachable, fresh_name

_ACK_PREFETCH = 500
_BATCH = 1000
_WAIT_S = 30.0


class _Queue(Durable):
    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, name: str) -> None:
        self.connection = connection
        self.exchange = channel.default_exchange
        self.name = name

    def _message(self, payload: bytes) -> aio_pika.Message:
        return aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

    async def publish(self, payload: bytes) -> None:
        await self.exchange.publish(self._message(payload), routing_key=self.name)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        await asyncio.gather(
            *(self.exchange.publish(self._message(p), routing_key=self.name) for p in payloads)
        )

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        async with self._consumer(_ACK_PREFETCH) as queue, queue.iterator() as messages:
            seen = 0
            async for message in messages:
                on_payload(message.body)
                await message.ack()
                seen += 1
                if seen == count:
                    return

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        async with self._consumer(_BATCH) as queue, queue.iterator() as messages:
            seen = 0
            async for message in messages:
                on_payload(message.body)
                seen += 1
                if seen % _BATCH == 0 or seen == count:
                    await message.ack(multiple=True)
                if seen == count:
                    return

    @contextlib.asynccontextmanager
    async def _consumer(self, prefetch: int) -> AsyncIterator[AbstractQueue]:
        channel = await self.connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            yield await channel.get_queue(self.name)
        finally:
            await channel.close()


class _Fanout(Core):
    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange) -> None:
        self.channel = channel
        self.exchange = exchange
        self.replies: dict[str, asyncio.Future[bytes]] = {}

    async def subscribe(self, on_payload: OnPayload) -> None:
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self.exchange)

        async def deliver(message: AbstractIncomingMessage) -> None:
            on_payload(message.body)

        await queue.consume(deliver, no_ack=True)

    async def publish(self, payload: bytes) -> None:
        await self.exchange.publish(aio_pika.Message(payload), routing_key="")

    async def serve_echo(self) -> None:
        self.requests = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)

        async def answer(request: AbstractIncomingMessage) -> None:
            reply = aio_pika.Message(request.body, correlation_id=request.correlation_id)
            await self.channel.default_exchange.publish(reply, routing_key=request.reply_to or "")

        async def replied(reply: AbstractIncomingMessage) -> None:
            waiter = self.replies.pop(reply.correlation_id or "", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply.body)

        await self.requests.consume(answer, no_ack=True)
        await self.reply_queue.consume(replied, no_ack=True)

    async def request(self, payload: bytes) -> bytes:
        correlation = uuid.uuid4().hex
        waiter = self.replies[correlation] = asyncio.get_running_loop().create_future()
        message = aio_pika.Message(payload, correlation_id=correlation, reply_to=self.reply_queue.name)
        await self.channel.default_exchange.publish(message, routing_key=self.requests.name)
        return await asyncio.wait_for(waiter, _WAIT_S)


class RabbitMQ(System):
    name = "rabbitmq"
    title = "RabbitMQ with publisher confirms (aio-pika)"
    kind = "networked"
    service_url = "amqp://guest:guest@127.0.0.1:5672/"
    unsupported = {
        "backlog_memory": "the machine's shared RabbitMQ, not started by the harness: its peak RSS "
        "is not this backlog's alone",
    }

    async def open(self) -> None:
        try:
            self.connection = await aio_pika.connect(self.where.address, timeout=5)
        except Exception as error:
            raise Unreachable(f"RabbitMQ at {self.where.address}: {error}") from error
        self.confirming = await self.connection.channel(publisher_confirms=True)
        self.transient = await self.connection.channel(publisher_confirms=False)

    async def close(self) -> None:
        await self.connection.close()

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        name = fresh_name()
        queue = await self.confirming.declare_queue(name, durable=True)
        try:
            yield _Queue(self.connection, self.confirming, name)
        finally:
            await queue.delete(if_unused=False, if_empty=False)

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        exchange = await self.transient.declare_exchange(
            fresh_name("core"), aio_pika.ExchangeType.FANOUT, auto_delete=True
        )
        try:
            yield _Fanout(self.transient, exchange)
        finally:
            await exchange.delete()
