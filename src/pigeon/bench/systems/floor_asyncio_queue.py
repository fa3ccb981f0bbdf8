"""The in-memory floor: an unbounded ``asyncio.Queue`` in this process, nothing stored.

What the interpreter costs to hand a message from one coroutine to another; every queue
above it adds storage, a network or both. A "consume with ack" is ``get`` then ``task_done``;
request-reply answers through a future.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from .base import Background, Core, Durable, OnPayload, System

_BATCH = 1000


class _Queue(Durable):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def publish(self, payload: bytes) -> None:
        await self.queue.put(payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        put = self.queue.put_nowait
        for payload in payloads:
            put(payload)

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        for _ in range(count):
            on_payload(await self.queue.get())
            self.queue.task_done()

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        seen = 0
        while seen < count:
            batch = [await self.queue.get()]
            while len(batch) < _BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for payload in batch:
                on_payload(payload)
                self.queue.task_done()
            seen += len(batch)


class _Core(Core):
    def __init__(self) -> None:
        self.subscribers: list[OnPayload] = []
        self.requests: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]] = asyncio.Queue()
        self.background = Background()

    async def subscribe(self, on_payload: OnPayload) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.subscribers.append(queue.put_nowait)

        async def deliver() -> None:
            while True:
                on_payload(await queue.get())

        self.background.start(deliver())

    async def publish(self, payload: bytes) -> None:
        for deliver in self.subscribers:
            deliver(payload)
        await asyncio.sleep(0)  # a publisher that never yields would starve its subscribers

    async def serve_echo(self) -> None:
        async def answer() -> None:
            while True:
                payload, reply = await self.requests.get()
                reply.set_result(payload)

        self.background.start(answer())

    async def request(self, payload: bytes) -> bytes:
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.requests.put_nowait((payload, reply))
        return await reply


class AsyncioQueue(System):
    name = "floor_asyncio_queue"
    title = "floor: asyncio.Queue (memory only)"
    kind = "floor"

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        yield _Queue()

    @contextlib.asynccontextmanager
    async def core(self) -> AsyncIterator[Core]:
        core = _Core()
        try:
            yield core
        finally:
            await core.background.cancel()
