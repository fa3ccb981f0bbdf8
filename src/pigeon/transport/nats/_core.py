"""Core subscriptions: NATS subjects as they are, at most once."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from ...errors import TransportClosedError
from ...message import Headers, Message
from ..base import Subscription
from ._codec import read_message
from ._options import ACK_INBOX_ROOT

log = logging.getLogger("pigeon.transport.nats")


class NatsSubscription(Subscription):
    """A NATS subscription (in a queue group when asked), buffering up to ``limit`` messages;
    beyond that the oldest are dropped (counted in ``dropped`` and logged).

    A pattern whose first token is a wildcard does not see NATS's own traffic: subjects
    starting with ``$`` (JetStream's API, pigeon's partitioned copies and coordination) or
    ``_INBOX.`` (replies). A message published with a reply subject carries it as
    `Headers.REPLY_TO`, except the acknowledgement inboxes of pigeon's stored publishes,
    which are not requests.
    """

    def __init__(self, pattern: str, limit: int, on_unsubscribe: Callable[[NatsSubscription], None]) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._limit = limit
        self._hide_system = pattern.split(".", 1)[0] in ("*", ">")
        self._on_unsubscribe = on_unsubscribe
        self._queue: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._sub: NatsSub | None = None
        self._closed = False

    def attach(self, sub: NatsSub) -> None:
        self._sub = sub

    async def receive(self, msg: Msg) -> None:
        subject = msg.subject
        if self._hide_system and (subject.startswith("$") or subject.startswith("_INBOX.")):
            return
        message = read_message(subject, msg.data, msg.headers)
        if msg.reply and not msg.reply.startswith(ACK_INBOX_ROOT):
            message.headers[Headers.REPLY_TO] = msg.reply
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning(
                    "subscription %r is too slow: %d messages dropped so far", self.pattern, self.dropped
                )
        self._queue.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> Message:
        while not self._queue:
            if self._closed:
                raise TransportClosedError(f"the subscription to {self.pattern!r} was closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise TimeoutError(f"no message on {self.pattern!r} within {timeout}s") from None
            finally:
                self._waiter = None
        return self._queue.popleft()

    def close(self) -> None:
        """The connection is gone: wake whoever waits."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def unsubscribe(self) -> None:
        if self._closed:
            return
        self.close()
        self._on_unsubscribe(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as error:  # closed connection: nothing left to stop
                log.debug("unsubscribing %r failed: %r", self.pattern, error)
