"""Push consumption: pigeon calls your handler, with bounded concurrency and back-pressure.

The handler gets a `Delivery`. When it returns, the delivery is acknowledged (unless the
handler settled it itself); when it raises, the delivery is nacked with the error, so the
group's redelivery, backoff and dead-letter rules apply. No more than ``max_outstanding``
messages (and about ``max_outstanding_bytes`` of payload) are held at once: a slow handler
slows fetching instead of growing memory. For an ordered group each partition is handled in
order, one message at a time, and partitions proceed in parallel; when a partition is
revoked, its running handler is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ...errors import InvalidConfigError, PigeonError
from .delivery import Delivery
from .ordered import OrderedMember
from .shared import SharedMember

log = logging.getLogger("pigeon.engine")

Handler = Callable[[Delivery], Awaitable[object]]


class _Budget:
    """Messages and bytes held by handlers right now; fetching waits while it is spent."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def room(self) -> int:
        if self.bytes >= self.max_bytes:
            return 0
        return self.max_messages - self.messages

    def bytes_room(self) -> int:
        return max(1, self.max_bytes - self.bytes)

    def take(self, delivery: Delivery) -> None:
        self.messages += 1
        self.bytes += len(delivery.message.payload)

    def give(self, delivery: Delivery) -> None:
        self.messages -= 1
        self.bytes -= len(delivery.message.payload)
        self._changed.set()

    async def wait_for_room(self) -> None:
        while self.room() <= 0:
            self._changed.clear()
            await self._changed.wait()


async def consume(
    member: OrderedMember | SharedMember,
    handler: Handler,
    *,
    max_outstanding: int = 100,
    max_outstanding_bytes: int = 16 * 1024 * 1024,
    stop: asyncio.Event | None = None,
    poll_s: float = 1.0,
) -> None:
    """Run ``handler`` on every delivery until ``stop`` is set (or the task is cancelled).

    On stop, fetching ends and in-flight handlers are awaited.
    """
    if isinstance(max_outstanding, bool) or not isinstance(max_outstanding, int) or max_outstanding < 1:
        raise InvalidConfigError(f"max_outstanding must be a positive integer, not {max_outstanding!r}")
    if not isinstance(max_outstanding_bytes, int) or max_outstanding_bytes < 1:
        raise InvalidConfigError(
            f"max_outstanding_bytes must be a positive integer, not {max_outstanding_bytes!r}"
        )
    budget = _Budget(max_outstanding, max_outstanding_bytes)
    running: set[asyncio.Task[None]] = set()
    ordered = isinstance(member, OrderedMember)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            await budget.wait_for_room()
            fetch = asyncio.ensure_future(member.fetch(budget.room(), poll_s, max_bytes=budget.bytes_room()))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
                break
            deliveries = fetch.result()
            for delivery in deliveries:
                budget.take(delivery)
            if ordered:
                by_partition: dict[int, list[Delivery]] = {}
                for delivery in deliveries:
                    by_partition.setdefault(delivery.partition, []).append(delivery)
                for batch in by_partition.values():
                    _start(running, _run_in_order(batch, handler, budget))
            else:
                for delivery in deliveries:
                    _start(running, _run_one(delivery, handler, budget))
    finally:
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def _start(running: set[asyncio.Task[None]], coro: Awaitable[None]) -> None:
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    running.add(task)
    task.add_done_callback(running.discard)


async def _run_one(delivery: Delivery, handler: Handler, budget: _Budget) -> None:
    task = asyncio.current_task()
    assert task is not None
    delivery.cancelled.add_callback(task.cancel)
    try:
        await _handle(delivery, handler)
    except asyncio.CancelledError:
        if not delivery.cancelled.is_set():
            raise  # the consumer itself is being cancelled
    finally:
        delivery.cancelled.remove_callback(task.cancel)
        budget.give(delivery)


async def _run_in_order(batch: list[Delivery], handler: Handler, budget: _Budget) -> None:
    task = asyncio.current_task()
    assert task is not None
    cancelled = batch[0].cancelled  # one signal per batch: revocation or a rewind
    cancelled.add_callback(task.cancel)
    try:
        for delivery in batch:
            if cancelled.is_set():
                break  # revoked, or rewound by a nack: the rest comes again, in order
            await _handle(delivery, handler)
    except asyncio.CancelledError:
        if not cancelled.is_set():
            raise
    finally:
        cancelled.remove_callback(task.cancel)
        for delivery in batch:
            budget.give(delivery)


async def _handle(delivery: Delivery, handler: Handler) -> None:
    """Run the handler and settle the delivery by its outcome."""
    try:
        await handler(delivery)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not delivery.settled:
            with contextlib.suppress(PigeonError):
                await delivery.nack(error=exc)
        return
    if not delivery.settled:
        try:
            await delivery.ack()
        except PigeonError as exc:  # lost the delivery meanwhile: it will be redelivered
            log.warning("could not ack %r: %s", delivery, exc)
