"""Redis Streams through redis-py's asyncio client, on the machine's Redis.

``XADD`` awaited one at a time, or 1000 in a non-transactional pipeline; a consumer group read
with ``XREADGROUP`` and one ``XACK`` per message, or one ``XACK`` of a whole batch (a single
consumer keeps the stream's order). Core pub/sub is ``PUBLISH``/``SUBSCRIBE``. Durability is
whatever the server is configured with (``appendonly``, ``appendfsync``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import redis.asyncio as redis

from .base import Background, Core, Durable, OnPayload, System, Unreachable, fresh_name

_GROUP = "bench"
_ACK_FETCH = 500
_BATCH_FETCH = 1000
_BLOCK_MS = 1000


class _Stream(Durable):
    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    async def publish(self, payload: bytes) -> None:
        await self.client.xadd(self.key, {"d": payload})

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.key, {"d": payload})
        await pipe.execute()

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        async for entries in self._read(count, _ACK_FETCH):
            for entry_id, fields in entries:
                on_payload(fields[b"d"])
                await self.client.xack(self.key, _GROUP, entry_id)

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        async for entries in self._read(count, _BATCH_FETCH):
            for _, fields in entries:
                on_payload(fields[b"d"])
            await self.client.xack(self.key, _GROUP, *(entry_id for entry_id, _ in entries))

    async def _read(self, count: int, fetch: int) -> AsyncIterator[list[Any]]:
        await self.client.xgroup_create(self.key, _GROUP, id="0", mkstream=True)
        seen = 0
        while seen < count:
            reply = await self.client.xreadgroup(_GROUP, "c", {self.key: ">"}, count=fetch, block=_BLOCK_MS)
            for _, entries in cast(list[Any], reply):  # RESP2 replies: [[key, entries]]
                yield entries
                seen += len(entries)


class _PubSub(Core):
    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.pubsub = client.pubsub()
        self.background = Background()

    async def subscribe(self, on_payload: OnPayload) -> None:
        await self.pubsub.subscribe(self.channel)
        await self.pubsub.get_message(timeout=5.0)  # the confirmation: subscribed from here on

        async def deliver() -> None:
            async for message in self.pubsub.listen():
                if message["type"] == "message":
                    on_payload(message["data"])

        self.background.start(deliver())

    async def publish(self, payload: bytes) -> None:
        await self.client.publish(self.channel, payload)


class RedisStreams(System):
    name = "redis_streams"
    title = "Redis Streams (redis-py)"
    kind = "networked"
    service_url = "redis://127.0.0.1:6379/0"
    unsupported = {
        "request_reply": "Redis has no request-reply; applications build it from lists or pub/sub",
        "backlog_memory": "the machine's shared Redis, not started by the harness: its peak RSS "
        "is not this backlog's alone",
    }

    async def open(self) -> None:
        self.client = redis.Redis.from_url(self.where.address)
        try:
            await self.client.ping()
        except (redis.RedisError, OSError) as error:
            await self.client.aclose()
            raise Unreachable(f"Redis at {self.where.address}: {error}") from error

    async def close(self) -> None:
        await self.client.aclose()

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        key = fresh_name()
        try:
            yield _Stream(self.client, key)
        finally:
            await self.client.delete(key)

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        core = _PubSub(self.client, fresh_name("core"))
        try:
            yield core
        finally:
            await core.background.cancel()
            await core.pubsub.aclose()  # type: ignore[no-untyped-call]
