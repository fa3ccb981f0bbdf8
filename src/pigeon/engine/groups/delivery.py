"""A message handed to a group member, with the operations that settle it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ...message import Message

if TYPE_CHECKING:
    import asyncio


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

    __slots__ = ("_settler", "cancelled", "delivery_count", "group", "lease", "message", "settled")

    def __init__(
        self,
        message: Message,
        group: str,
        delivery_count: int,
        settler: Settler,
        lease: int,
        cancelled: asyncio.Event,
    ) -> None:
        self.message = message
        self.group = group
        self.delivery_count = delivery_count
        self.lease = lease
        self.cancelled = cancelled
        self.settled = False
        self._settler = settler

    @property
    def partition(self) -> int:
        assert self.message.partition is not None
        return self.message.partition

    @property
    def offset(self) -> int:
        assert self.message.offset is not None
        return self.message.offset

    async def ack(self) -> None:
        """Processing succeeded: never deliver this message to this group again."""
        await self._settler._ack(self)

    async def nack(
        self, delay: float | None = None, *, error: BaseException | str | None = None
    ) -> None:
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
