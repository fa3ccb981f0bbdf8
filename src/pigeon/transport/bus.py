"""The in-process core bus: subject routing, queue groups, request-reply, slow subscribers.

Used by the memory and embedded transports for their core (non-durable) pub/sub. Each
subscription has a bounded buffer. When a subscriber falls behind, its policy decides: drop
the oldest buffered message, drop the new one, or make the publisher wait (up to a timeout,
then drop the new one). Every drop is counted (per subscription and on the bus) and logged
as a warning: one slow subscriber must never stall or crash the publisher silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidConfigError, NoRespondersError, RequestTimeoutError, TransportClosedError
from ..message import Headers, Message
from ..subjects import SubjectIndex, validate_pattern, validate_subject
from .base import Subscription

log = logging.getLogger("pigeon.transport.bus")

Overflow = Literal["drop_oldest", "drop_newest", "block"]


@dataclass(frozen=True)
class BusOptions:
    """How core subscriptions buffer: ``buffer_size`` messages each, then ``overflow``."""

    buffer_size: int = 10_000
    overflow: Overflow = "drop_oldest"
    block_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.buffer_size, bool)
            or not isinstance(self.buffer_size, int)
            or self.buffer_size < 1
        ):
            raise InvalidConfigError(f"buffer_size must be a positive integer, not {self.buffer_size!r}")
        if self.overflow not in ("drop_oldest", "drop_newest", "block"):
            raise InvalidConfigError(
                f"overflow must be 'drop_oldest', 'drop_newest' or 'block', not {self.overflow!r}"
            )
        if not isinstance(self.block_timeout_s, int | float) or self.block_timeout_s < 0:
            raise InvalidConfigError(
                f"block_timeout_s must be a non-negative number, not {self.block_timeout_s!r}"
            )


class BusSubscription(Subscription):
    def __init__(self, bus: Bus, pattern: str, queue: str | None, options: BusOptions) -> None:
        self.bus = bus
        self.pattern = pattern
        self.queue = queue
        self.options = options
        self.dropped = 0
        self.closed = False
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()

    async def _offer(self, message: Message) -> None:
        if len(self._buffer) >= self.options.buffer_size:
            overflow = self.options.overflow
            if overflow == "block":
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.options.block_timeout_s)
                if len(self._buffer) >= self.options.buffer_size:
                    self._drop(message, "publisher waited out block_timeout_s")
                    return
            elif overflow == "drop_newest":
                self._drop(message, "buffer full, dropped the new message")
                return
            else:
                self._drop(self._buffer.popleft(), "buffer full, dropped the oldest message")
        self._buffer.append(message)
        self._arrived.set()

    def _drop(self, message: Message, why: str) -> None:
        self.dropped += 1
        self.bus.dropped += 1
        log.warning(
            "slow subscriber on %r (queue %r): %s on %r (%d dropped so far)",
            self.pattern,
            self.queue,
            why,
            message.subject,
            self.dropped,
        )

    async def next(self, timeout: float | None = None) -> Message:
        while not self._buffer:
            if self.closed:
                raise TransportClosedError(f"subscription to {self.pattern!r} is closed")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        message = self._buffer.popleft()
        self._room.set()
        return message

    async def unsubscribe(self) -> None:
        if not self.closed:
            self.closed = True
            self.bus._remove(self)
            self._arrived.set()


class Bus:
    def __init__(self, options: BusOptions | None = None) -> None:
        self.options = options or BusOptions()
        self.dropped = 0
        self._index: SubjectIndex[BusSubscription] = SubjectIndex()
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}
        self._subscriptions: set[BusSubscription] = set()
        self._closed = False

    def subscribe(self, pattern: str, queue: str | None = None) -> BusSubscription:
        if self._closed:
            raise TransportClosedError("the bus is closed")
        validate_pattern(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or " " in queue):
            raise InvalidConfigError(f"queue group name must be non-empty text without spaces, not {queue!r}")
        subscription = BusSubscription(self, pattern, queue, self.options)
        self._index.add(pattern, subscription)
        self._subscriptions.add(subscription)
        return subscription

    def _remove(self, subscription: BusSubscription) -> None:
        self._index.remove(subscription.pattern, subscription)
        self._subscriptions.discard(subscription)

    def _targets(self, subject: str) -> list[BusSubscription]:
        targets = []
        groups: dict[tuple[str, str], list[BusSubscription]] = {}
        for subscription in self._index.match(subject):
            if subscription.queue is None:
                targets.append(subscription)
            else:
                groups.setdefault((subscription.pattern, subscription.queue), []).append(subscription)
        for key, members in groups.items():
            # One member of each queue group, in turn.
            turn = next(self._turns.setdefault(key, itertools.count()))
            targets.append(members[turn % len(members)])
        return targets

    async def publish(self, message: Message) -> int:
        """Deliver to every matching subscription (one per queue group); returns how many."""
        if self._closed:
            raise TransportClosedError("the bus is closed")
        validate_subject(message.subject)
        targets = self._targets(message.subject) if self._subscriptions else []
        for subscription in targets:
            await subscription._offer(message)
        return len(targets)

    def has_subscribers(self, subject: str) -> bool:
        """Whether a publish to ``subject`` would reach anyone (lets callers skip building it)."""
        return bool(self._subscriptions) and bool(self._index.match(subject))

    async def request(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None, timeout: float
    ) -> Message:
        inbox = f"_INBOX.{uuid.uuid4().hex}"
        replies = self.subscribe(inbox)
        try:
            request = Message(subject, payload, headers={**(headers or {}), Headers.REPLY_TO: inbox})
            if not await self.publish(request):
                raise NoRespondersError(f"no subscriber for request on {subject!r}")
            try:
                return await replies.next(timeout)
            except TimeoutError:
                raise RequestTimeoutError(f"no reply to request on {subject!r} within {timeout}s") from None
        finally:
            await replies.unsubscribe()

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.unsubscribe()
