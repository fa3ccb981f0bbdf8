"""The SQLite-based queues, used in this process as their documentation shows (synchronous).

litequeue: ``put`` autocommits each message; pipelined puts run in one ``transaction()``;
``pop`` then ``done`` acknowledges each. persist-queue: ``SQLiteAckQueue``, ``put`` committing
each message (the ack queue has no batched commit); ``get`` then ``ack``. Neither has batch
consumption, pub/sub or request-reply. Their calls block the event loop, as they would in an
asyncio program that uses them: while a consumer finds the queue empty it sleeps a
millisecond so the publisher can run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import litequeue  # type: ignore[import-untyped]
import persistqueue

from .base import Durable, OnPayload, System, fresh_name

_EMPTY_POLL_S = 0.001
_QUEUE_ONLY = {
    "consume_ordered_batch": "no batch get or batch acknowledgement",
    "pubsub": "a queue: no publish/subscribe",
    "request_reply": "a queue: no request-reply",
}


class _LiteQueue(Durable):
    def __init__(self, path: Path) -> None:
        self.queue = litequeue.LiteQueue(str(path))

    async def publish(self, payload: bytes) -> None:
        self.queue.put(payload.decode())

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        with self.queue.transaction():
            for payload in payloads:
                self.queue.put(payload.decode())

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        seen = 0
        while seen < count:
            message = self.queue.pop()
            if message is None:
                await asyncio.sleep(_EMPTY_POLL_S)
                continue
            on_payload(message.data.encode())
            self.queue.done(message.message_id)
            seen += 1


class _PersistQueue(Durable):
    def __init__(self, path: Path) -> None:
        self.queue = persistqueue.SQLiteAckQueue(str(path), multithreading=False)

    async def publish(self, payload: bytes) -> None:
        self.queue.put(payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        """Only fills queues for the consume workloads: see `PersistQueueSystem.unsupported`."""
        for payload in payloads:
            self.queue.put(payload)

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        seen = 0
        while seen < count:
            try:
                item = self.queue.get(block=False, raw=True)
            except persistqueue.Empty:
                await asyncio.sleep(_EMPTY_POLL_S)
                continue
            on_payload(item["data"])
            self.queue.ack(id=item["pqid"])
            seen += 1


class _SQLiteQueue(System):
    kind = "in-process"
    unsupported = _QUEUE_ONLY

    def _open(self, path: Path) -> Any:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        folder = Path(self.where.address) / fresh_name()
        folder.mkdir()
        yield self._open(folder)


class LiteQueueSystem(_SQLiteQueue):
    name = "litequeue"
    title = "litequeue (SQLite)"

    def _open(self, path: Path) -> Durable:
        return _LiteQueue(path / "queue.sqlite3")


class PersistQueueSystem(_SQLiteQueue):
    name = "persist_queue"
    title = "persist-queue SQLiteAckQueue"
    unsupported = _QUEUE_ONLY | {
        "publish_pipelined": "SQLiteAckQueue commits every put (it refuses auto_commit=False)",
    }

    def _open(self, path: Path) -> Durable:
        return _PersistQueue(path)
