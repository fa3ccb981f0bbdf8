"""A message handed to a group member, with the operations that settle it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ...message import Message


class CancelSignal:
    """Set when a delivery may no longer be settled by its holder; observable by handlers.

    Cheaper than an `asyncio.Event` (one per delivery adds up) and it takes callbacks, so a
    push consumer can cancel the handler's task the moment its partition is revoked.
    """

    __slots__ = ("_callbacks", "_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._callbacks: list[Callable[[], object]] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        callbacks, self._callbacks = self._callbacks or [], None
        waiters, self._waiters = self._waiters or [], None
        for callback in callbacks:
            callback()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def add_callback(self, callback: Callable[[], object]) -> None:
        if self._set:
            callback()
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], object]) -> None:
        if self._callbacks and callback in self._callbacks:
            self._callbacks.remove(callback)

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        await waiter


class Settler(Protocol):
    async def _ack(self, delivery: Delivery) -> None: ...
    async def _nack(
        self, delivery: Delivery, delay: float | None, error: BaseException | str | None
    ) -> None: ...
    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None: ...
    async def _in_progress(self, delivery: Delivery) -> None: ...


class Delivery:
    """One delivery of a stored message to one member of a group.

    Settle it exactly once with `ack`, `nack` or `term`; `in_progress` extends its lease.
    ``cancelled`` is set when the member lost the right to settle it (its partition was
    revoked in a rebalance, or its lease moved to another member): a handler can watch it to
    stop early, and settling it then raises `DeliveryNotOwnedError`.
    """

    __slots__ = (
        "_cancelled",
        "_settler",
        "deadline",
        "delivery_count",
        "group",
        "holder",
        "lease",
        "message",
        "offset",
        "partition",
        "settled",
    )

    def __init__(
        self,
        message: Message,
        group: str,
        delivery_count: int,
        settler: Settler,
        lease: int,
        cancelled: CancelSignal | None = None,
        holder: Any = None,
        deadline: float = 0.0,
    ) -> None:
        self.message = message
        # Copied from the message (always set on stored messages): read on every settle.
        self.partition: int = message.partition  # type: ignore[assignment]
        self.offset: int = message.offset  # type: ignore[assignment]
        self.group = group
        self.delivery_count = delivery_count
        self.lease = lease
        self._cancelled = cancelled
        self.settled = False
        self._settler = settler
        # Shared groups keep the lease on the delivery itself: who holds it, and until when.
        self.holder: Any = holder
        self.deadline = deadline

    @property
    def cancelled(self) -> CancelSignal:
        """Set when the holder lost this delivery; created on first use (most never need it)."""
        if self._cancelled is None:
            self._cancelled = CancelSignal()
        return self._cancelled

    def is_cancelled(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()

    def ack(self) -> Coroutine[Any, Any, None]:
        """Processing succeeded: never deliver this message to this group again.

        A coroutine to await, as from an ``async def`` (the group's own: one frame less on the
        hottest path). It has settled the delivery once the await returns.
        """
        return self._settler._ack(self)

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        """Processing failed: deliver again after ``delay`` seconds (default: the group's backoff).

        ``error`` is remembered and written on the dead letter if the message ends there.
        """
        await self._settler._nack(self, delay, error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        """Stop redelivering: the message goes to the group's dead letters (when enabled)."""
        await self._settler._term(self, reason)

    async def in_progress(self) -> None:
        """Still working on it: extend the lease (shared) or count as a poll (ordered)."""
        await self._settler._in_progress(self)

    def __repr__(self) -> str:
        return (
            f"<Delivery {self.message.subject!r} {self.message.stream}[{self.partition}]@{self.offset} "
            f"group={self.group} delivery={self.delivery_count}>"
        )
