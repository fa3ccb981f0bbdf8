"""Core messaging over Redis pub/sub: subscriptions, queue groups, request-reply inboxes.

One pub/sub connection per transport carries every subscription; a listener task routes what
arrives to the local subscriptions. A literal subject is a SUBSCRIBE to its channel; a pattern
is a PSUBSCRIBE to a glob that may over-match (see `Keys.glob`), filtered here with
`pigeon.subjects.matches`. Subscriptions wait for Redis's confirmation, so a publish made
after `subscribe` returns is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio
import redis.exceptions

from ...errors import InvalidConfigError, TransportClosedError
from ...message import Message
from ...subjects import matches, validate_pattern
from ..base import Subscription
from ._codec import decode_frame
from ._options import Keys

log = logging.getLogger("pigeon.transport.redis")

# How often queue-group members re-register: a publisher drops a registration whose channel
# had no listener (its member's connection was down), and this puts it back.
_QUEUE_REFRESH_S = 5.0
_CONFIRM_TIMEOUT_S = 10.0


class RedisSubscription(Subscription):
    def __init__(self, core: Core, pattern: str, queue: str | None, buffer_size: int) -> None:
        self.core = core
        self.pattern = pattern
        self.queue = queue
        self.literal = "*" not in pattern.split(".") and ">" not in pattern.split(".")
        self.name = ""  # the channel or glob it listens on
        self.member = ""  # queue groups: this member's id
        self.dropped = 0
        self.closed = False
        self._buffer_size = buffer_size
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()

    def _offer(self, message: Message) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self.dropped += 1
            log.warning(
                "slow subscriber on %r (queue %r): buffer full, dropped the oldest message (%d so far)",
                self.pattern,
                self.queue,
                self.dropped,
            )
        self._buffer.append(message)
        self._arrived.set()

    async def next(self, timeout: float | None = None) -> Message:
        while not self._buffer:
            if self.closed:
                raise TransportClosedError(f"subscription to {self.pattern!r} is closed")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return self._buffer.popleft()

    async def unsubscribe(self) -> None:
        if not self.closed:
            self.closed = True
            self._arrived.set()
            await self.core.remove(self)


class _Inbox:
    """The replies to this transport's requests: one pattern subscription, one future each."""

    def __init__(self, subject_prefix: str) -> None:
        self.subject_prefix = subject_prefix
        self.waiting: dict[str, asyncio.Future[Message]] = {}
        self.counter = itertools.count()
        self.closed = False

    def _offer(self, message: Message) -> None:
        future = self.waiting.pop(message.subject, None)
        if future is not None and not future.done():
            future.set_result(message)


_Listener = RedisSubscription | _Inbox


class Core:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys, buffer_size: int) -> None:
        self.client = client
        self.keys = keys
        self.buffer_size = buffer_size
        self.pubsub = client.pubsub()
        self._channels: dict[bytes, list[_Listener]] = {}
        self._patterns: dict[bytes, list[_Listener]] = {}
        self._members: dict[bytes, RedisSubscription] = {}  # queue member channel -> member
        self._confirm: dict[tuple[str, bytes], asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._inbox: _Inbox | None = None
        self._closed = False

    # -- subscribing --------------------------------------------------------------------------

    async def subscribe(self, pattern: str, queue: str | None) -> RedisSubscription:
        self._check_open()
        validate_pattern(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)):
            raise InvalidConfigError(f"queue group name must be non-empty text without spaces, not {queue!r}")
        subscription = RedisSubscription(self, pattern, queue, self.buffer_size)
        if queue is not None:
            # Each member listens on a channel of its own; publishers pick one member per group.
            subscription.member = uuid.uuid4().hex
            channel = self.keys.queue_channel(subscription.member)
            subscription.name = channel
            async with self._lock:
                self._members[channel.encode()] = subscription
                await self._add("subscribe", channel.encode(), None)
            await self.client.hset(self.keys.queues, subscription.member, f"{queue}\n{pattern}")
            if self._refresher is None:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_queues())
            return subscription
        if subscription.literal:
            subscription.name = self.keys.channel(pattern)
            async with self._lock:
                await self._add("subscribe", subscription.name.encode(), subscription)
        else:
            subscription.name = self.keys.glob(pattern)
            async with self._lock:
                await self._add("psubscribe", subscription.name.encode(), subscription)
        return subscription

    async def _add(self, kind: str, name: bytes, listener: _Listener | None) -> None:
        """Register ``listener`` under a channel or glob; subscribe in Redis for the first one."""
        table = self._patterns if kind == "psubscribe" else self._channels
        listeners = table.get(name)
        if listeners is None:
            listeners = table[name] = []
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._confirm[(kind, name)] = future
            if kind == "psubscribe":
                await self.pubsub.psubscribe(name)
            else:
                await self.pubsub.subscribe(name)
            if self._listener is None:
                self._listener = asyncio.get_running_loop().create_task(self._listen())
        else:
            pending = self._confirm.get((kind, name))
            future = pending if pending is not None else asyncio.get_running_loop().create_future()
            if pending is None:
                future.set_result(None)
        if listener is not None:
            listeners.append(listener)
        try:
            await asyncio.wait_for(asyncio.shield(future), _CONFIRM_TIMEOUT_S)
        except TimeoutError:
            raise TransportClosedError(
                f"redis did not confirm the subscription to {name.decode()!r} within {_CONFIRM_TIMEOUT_S}s"
            ) from None

    async def remove(self, subscription: RedisSubscription) -> None:
        if self._closed:
            return
        name = subscription.name.encode()
        async with self._lock:
            if subscription.queue is not None:
                self._members.pop(name, None)
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self.client.hdel(self.keys.queues, subscription.member)
                await self._drop(self._channels, name, None, self.pubsub.unsubscribe)
            elif subscription.literal:
                await self._drop(self._channels, name, subscription, self.pubsub.unsubscribe)
            else:
                await self._drop(self._patterns, name, subscription, self.pubsub.punsubscribe)

    async def _drop(
        self,
        table: dict[bytes, list[_Listener]],
        name: bytes,
        listener: _Listener | None,
        unsubscribe: Callable[..., Any],
    ) -> None:
        listeners = table.get(name)
        if listeners is None:
            return
        if listener is not None and listener in listeners:
            listeners.remove(listener)
        if not listeners:
            del table[name]
            with contextlib.suppress(redis.exceptions.RedisError):
                await unsubscribe(name)

    async def _refresh_queues(self) -> None:
        while not self._closed:
            await asyncio.sleep(_QUEUE_REFRESH_S)
            members: dict[Any, Any] = {
                s.member: f"{s.queue}\n{s.pattern}" for s in self._members.values() if not s.closed
            }
            if members:
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self.client.hset(self.keys.queues, mapping=members)

    # -- receiving ----------------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                message = await self.pubsub.get_message(timeout=None)
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the connection dropped: redis-py reconnects and resubscribes
                if self._closed:
                    return
                log.warning("redis pub/sub connection failed (%s); retrying in %.2fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("subscribe", "psubscribe"):
            future = self._confirm.pop((kind, message["channel"]), None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind == "message":
            channel = message["channel"]
            member = self._members.get(channel)
            core = decode_frame(message["data"])
            if core is None:
                return
            if member is not None:
                member._offer(core)
                return
            for listener in self._channels.get(channel, ()):
                listener._offer(core)
        elif kind == "pmessage":
            core = decode_frame(message["data"])
            if core is None:
                return
            for listener in self._patterns.get(message["pattern"], ()):
                # The glob may over-match: keep what the NATS pattern really matches.
                pattern = listener.pattern if isinstance(listener, RedisSubscription) else None
                if pattern is None or matches(pattern, core.subject):
                    listener._offer(core)

    # -- request-reply ------------------------------------------------------------------------

    async def inbox(self) -> tuple[str, asyncio.Future[Message]]:
        """A fresh reply subject and the future its first message resolves."""
        self._check_open()
        if self._inbox is None:
            async with self._lock:
                if self._inbox is None:
                    inbox = _Inbox(f"_INBOX.{uuid.uuid4().hex}.")
                    await self._add("psubscribe", self.keys.glob(inbox.subject_prefix + "*").encode(), inbox)
                    self._inbox = inbox
        assert self._inbox is not None
        subject = f"{self._inbox.subject_prefix}{next(self._inbox.counter)}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._inbox.waiting[subject] = future
        return subject, future

    def forget(self, reply_subject: str) -> None:
        if self._inbox is not None:
            self._inbox.waiting.pop(reply_subject, None)

    # -- closing ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("the redis transport is closed")

    async def close(self) -> None:
        if self._closed:
            return
        members = [s.member for s in self._members.values()]
        self._closed = True
        everyone: list[_Listener] = [*self._members.values()]
        for listeners in [*self._channels.values(), *self._patterns.values()]:
            everyone += listeners
        for listener in everyone:
            if isinstance(listener, RedisSubscription):
                listener.closed = True
                listener._arrived.set()
        if members:
            with contextlib.suppress(redis.exceptions.RedisError):
                await self.client.hdel(self.keys.queues, *members)
        for task in (self._listener, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for future in self._confirm.values():
            future.cancel()
        if self._inbox is not None:
            for waiting in self._inbox.waiting.values():
                waiting.cancel()
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
