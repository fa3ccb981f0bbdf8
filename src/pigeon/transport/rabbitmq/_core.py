"""Core messaging on RabbitMQ: subscriptions, queue groups and request-reply.

Everything goes through the topic exchange ``<prefix>.core``. A routing key there is
``<word>.<subject>``: the partition of a stored message (forwarded from its stream's
exchange) or ``_`` for a core-only publish; subscriptions bind ``*.<pattern>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldValue

from ...errors import InvalidConfigError, NoRespondersError, RequestTimeoutError, TransportClosedError
from ...message import Message, new_id
from ...subjects import matches, validate_subject
from ..base import Subscription
from ._channel import Chan, ChanFactory, cancel_quietly, unexpected
from ._codec import CORE_WORD, binding_key, check_headers, check_payload, decode, properties, routing_key
from ._options import Names, RabbitMQOptions

log = logging.getLogger("pigeon.transport.rabbitmq")

# Publish to the core exchange: (body, routing key, properties, mandatory); raises
# aiormq's PublishError when ``mandatory`` and nothing is bound.
# How long a queue group's queue outlives its last member (and keeps what is published
# meanwhile for the next member).
_QUEUE_GROUP_EXPIRY_MS = 5000

CorePublish = Callable[[bytes, str, Basic.Properties, bool], Awaitable[None]]


class CoreSubscription(Subscription):
    def __init__(self, core: Core, pattern: str, queue: str, exact: bool, group: str | None) -> None:
        self._core = core
        self.pattern = pattern
        self.queue = queue
        self.group = group
        self._exact = exact
        self.tag = ""
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._limit = core.options.subscription_buffer
        self.dropped = 0
        self._closed = False

    async def deliver(self, delivered: DeliveredMessage) -> None:
        message = decode(delivered, reply_to_header=True)
        if not self._exact and not matches(self.pattern, message.subject):
            return
        if len(self._buffer) >= self._limit:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning(
                    "subscription to %r is slow: dropped %d messages (oldest first)",
                    self.pattern,
                    self.dropped,
                )
        self._buffer.append(message)
        self._arrived.set()

    async def next(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer:
            if self._closed:
                raise TransportClosedError(f"the subscription to {self.pattern!r} was closed")
            if self._core.chan is None or self._core.chan.closed:
                raise TransportClosedError(f"the subscription to {self.pattern!r} lost its channel")
            self._arrived.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no message on {self.pattern!r} within {timeout}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
        return self._buffer.popleft()

    async def unsubscribe(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        await self._core.drop(self)


class Core:
    def __init__(
        self, open_chan: ChanFactory, names: Names, options: RabbitMQOptions, publish: CorePublish
    ) -> None:
        self._open_chan = open_chan
        self.names = names
        self.options = options
        self._publish = publish
        self.chan: Chan | None = None
        self._subscriptions: set[CoreSubscription] = set()
        self._lock = asyncio.Lock()
        self._inbox_id = uuid.uuid4().hex[:12]
        self._inbox_ready = False
        self._requests: dict[str, asyncio.Future[Message]] = {}
        self._counter = itertools.count(1)

    async def _channel(self) -> Chan:
        if self.chan is None or self.chan.closed:
            self.chan = await self._open_chan()
            self._inbox_ready = False
        return self.chan

    async def subscribe(self, pattern: str, queue: str | None) -> CoreSubscription:
        key, exact = binding_key(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)):
            raise InvalidConfigError(f"queue group name must be non-empty text without spaces, not {queue!r}")
        async with self._lock:
            chan = await self._channel()
            limits: dict[str, FieldValue] = {"x-max-length": self.options.subscription_buffer}
            try:
                if queue is None:
                    ok = await chan.raw.queue_declare("", exclusive=True, auto_delete=True, arguments=limits)
                    name = ok.queue or ""
                else:
                    # Shared by the group's members. Not auto-delete: a member joining as the
                    # last one leaves could find its queue gone between declare and consume.
                    # It expires once unused for a while instead (a declare renews it).
                    name = self.names.queue_group(queue, pattern)
                    await chan.raw.queue_declare(
                        name, arguments={**limits, "x-expires": _QUEUE_GROUP_EXPIRY_MS}
                    )
                await chan.raw.queue_bind(name, self.names.core, routing_key=key)
                subscription = CoreSubscription(self, pattern, name, exact, queue)
                ok_consume = await chan.raw.basic_consume(name, subscription.deliver, no_ack=True)
            except aiormq.exceptions.ChannelPreconditionFailed as error:
                raise InvalidConfigError(
                    f"queue group {queue!r} on {pattern!r} exists with other settings "
                    f"(subscription_buffer?): {error}"
                ) from None
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
                raise unexpected(error, f"subscribing to {pattern!r}") from None
            subscription.tag = ok_consume.consumer_tag or ""
            self._subscriptions.add(subscription)
            return subscription

    async def drop(self, subscription: CoreSubscription) -> None:
        self._subscriptions.discard(subscription)
        chan = self.chan
        if chan is None or chan.closed:
            return
        await cancel_quietly(chan, subscription.tag)
        if subscription.group is None:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await chan.raw.queue_delete(subscription.queue)

    # -- request-reply -------------------------------------------------------------------------

    async def _ensure_inbox(self) -> None:
        async with self._lock:
            chan = await self._channel()
            if self._inbox_ready:
                return
            ok = await chan.raw.queue_declare("", exclusive=True, auto_delete=True)
            name = ok.queue or ""
            await chan.raw.queue_bind(
                name, self.names.core, routing_key=f"{CORE_WORD}._INBOX.{self._inbox_id}.*"
            )
            await chan.raw.basic_consume(name, self._on_reply, no_ack=True)
            self._inbox_ready = True

    async def _on_reply(self, delivered: DeliveredMessage) -> None:
        message = decode(delivered)
        waiter = self._requests.pop(message.subject.rpartition(".")[2], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    async def request(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None, timeout: float
    ) -> Message:
        validate_subject(subject)
        body = check_payload(payload)
        table = check_headers(headers)
        try:
            await self._ensure_inbox()
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise unexpected(error, "creating the reply inbox") from None
        token = str(next(self._counter))
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[token] = waiter
        props = properties(
            new_id(),
            table,
            None,
            time.time(),
            persistent=False,
            reply_to=f"_INBOX.{self._inbox_id}.{token}",
        )
        try:
            try:
                await self._publish(body, routing_key(CORE_WORD, subject), props, True)
            except aiormq.exceptions.PublishError:
                raise NoRespondersError(f"no subscriber for the request to {subject!r}") from None
            try:
                async with asyncio.timeout(timeout):
                    return await waiter
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no reply to the request to {subject!r} within {timeout}s"
                ) from None
        finally:
            self._requests.pop(token, None)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription._closed = True
            subscription._arrived.set()
        self._subscriptions.clear()
        for waiter in self._requests.values():
            if not waiter.done():
                waiter.set_exception(TransportClosedError("the transport was closed"))
        if self.chan is not None:
            await self.chan.close()
