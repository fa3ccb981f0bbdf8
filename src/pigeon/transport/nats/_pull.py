"""Pull requests: how a group member gets messages from its JetStream consumers.

One inbox subscription per member; each partition's consumer gets at most one outstanding
pull request at a time, whose reply subject (``<inbox>.<p>.<n>``) names it, so that a late
status for an old request is recognised. Messages arrive with their own subjects, so they
are told apart by the stream named in their ``$JS.ACK`` reply subject. A second subscription
hears that the stream was purged, so that prefetched messages of the purge are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from ...errors import TransportClosedError
from ._codec import Delivered, parse_ack_subject

log = logging.getLogger("pigeon.transport.nats")

# Below this a pull request asks for what is there now (``no_wait``) instead of waiting.
MIN_EXPIRES_S = 0.05
# A request whose status never came is given up this long after it should have expired.
# Besides lost connections, nats-server 2.9 drops a request that expires at the very moment
# a redelivery is handed to it: the message is not sent (yet counted as delivered) and no
# status comes. Giving up soon keeps that from stalling a member.
_LOST_REQUEST_GRACE_S = 0.25
# Requests wait on the server this much longer than the fetch that sent them, so that a
# fetch timeout equal to ack_wait (a common choice) does not meet the redelivery instant.
EXPIRES_MARGIN_S = 0.1


class Arrival:
    """A message a pull request delivered, not yet handed to the application."""

    __slots__ = ("meta", "msg", "received")

    def __init__(self, msg: Msg, meta: Delivered) -> None:
        self.msg = msg
        self.meta = meta
        self.received = time.monotonic()

    @property
    def offset(self) -> int:
        return self.meta.stream_seq - 1


class _Request:
    __slots__ = ("ends", "number", "remaining")

    def __init__(self, number: int, batch: int, ends: float) -> None:
        self.number = number
        self.remaining = batch
        self.ends = ends


class Signal:
    """Wakes whoever waits. Take `armed` before looking at the state, then `wait` on it: a
    `set` in between (during an await) is not lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    @property
    def armed(self) -> asyncio.Event:
        return self._event

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True


class Puller:
    """The pull requests of one member over the consumers (one per partition) of its group."""

    def __init__(
        self,
        nc: Client,
        streams: tuple[str, ...],
        group: str,
        on_arrival: Callable[[int], Awaitable[None]],
        buffer_limit: int,
        purge_subject: str,
    ) -> None:
        self._nc = nc
        self._streams = streams
        self._group = group
        self._index = {name: p for p, name in enumerate(streams)}
        self._on_arrival = on_arrival
        self._buffer_limit = buffer_limit
        self.buffers: list[deque[Arrival]] = [deque() for _ in streams]
        self._requests: list[_Request | None] = [None] * len(streams)
        self._numbers = 0
        self._inbox = nc.new_inbox()
        self._sub: NatsSub | None = None
        self._purge_subject = purge_subject
        self._purge_sub: NatsSub | None = None
        # Per partition, the first stream sequence the latest purge kept: anything older that
        # still arrives (or waits in a buffer) was purged.
        self.purged_below = [0] * len(streams)
        self.deleted = False  # the server said the consumer is gone
        self._stopping = False
        self._unsubscribing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._sub = await self._nc.subscribe(
                f"{self._inbox}.>", cb=self._arrive, pending_msgs_limit=self._buffer_limit
            )
            self._purge_sub = await self._nc.subscribe(self._purge_subject, cb=self._on_purge)
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None

    async def stop(self) -> None:
        """Stop receiving. Requests still open on the server would hand their messages to
        an inbox nobody listens on (delivered to no one until ack_wait), so the inbox stays
        until they end, nak'ing whatever still arrives."""
        sub, self._sub = self._sub, None
        if sub is None or self._nc.is_closed:
            return
        purge_sub, self._purge_sub = self._purge_sub, None
        if purge_sub is not None:
            await self._unsubscribe(purge_sub, 0.0)
        self._stopping = True
        open_until = max((r.ends for r in self._requests if r is not None), default=0.0)
        wait = open_until + EXPIRES_MARGIN_S - time.monotonic()
        if wait > 0:
            self._unsubscribing = asyncio.create_task(self._unsubscribe(sub, wait))
        else:
            await self._unsubscribe(sub, 0.0)

    async def _unsubscribe(self, sub: NatsSub, after: float) -> None:
        await asyncio.sleep(after)
        if not self._nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception as error:  # the connection is going away anyway
                log.debug("unsubscribing a pull inbox failed: %r", error)

    def outstanding(self, p: int) -> bool:
        request = self._requests[p]
        if request is not None and time.monotonic() > request.ends + _LOST_REQUEST_GRACE_S:
            self._requests[p] = request = None
        return request is not None

    def next_expiry(self) -> float:
        """When the earliest outstanding request ends (monotonic), or infinity."""
        ends = [r.ends for r in self._requests if r is not None]
        return min(ends) + 0.01 if ends else float("inf")

    async def pull(self, p: int, batch: int, expires: float | None) -> int:
        """Ask partition ``p``'s consumer for up to ``batch`` messages, waiting up to ``expires``
        seconds for them (None: only what is there now). Returns the request's number."""
        self._numbers += 1
        now = time.monotonic()
        body: dict[str, Any] = {"batch": batch}
        if expires is None or expires < MIN_EXPIRES_S:
            body["no_wait"] = True
            ends = now
        else:
            body["expires"] = int(expires * 1e9)
            ends = now + expires
        self._requests[p] = _Request(self._numbers, batch, ends)
        await self._publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._streams[p]}.{self._group}",
            json.dumps(body).encode(),
            f"{self._inbox}.{p}.{self._numbers}",
        )
        return self._numbers

    async def _publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        try:
            await self._nc.publish(subject, payload, reply=reply)
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None

    def is_current(self, p: int, number: int) -> bool:
        request = self._requests[p]
        return request is not None and request.number == number and self.outstanding(p)

    async def _arrive(self, msg: Msg) -> None:
        reply = msg.reply
        if reply and self._stopping:
            with contextlib.suppress(Exception):
                await msg.nak()  # for the next member, at once
            return
        if reply:
            meta = parse_ack_subject(reply)
            p = None if meta is None else self._index.get(meta.stream)
            if meta is None or p is None:
                return
            if meta.stream_seq >= self.purged_below[p]:  # else sent just before a purge
                self.buffers[p].append(Arrival(msg, meta))
            request = self._requests[p]
            if request is not None:
                request.remaining -= 1
                if request.remaining <= 0:
                    self._requests[p] = None
            await self._on_arrival(p)
            return
        # A status: 404 (no messages), 408 (expired), 409 (max waiting, consumer deleted...).
        status = (msg.headers or {}).get("Status", "")
        if status == "100":
            return
        tail = msg.subject[len(self._inbox) + 1 :].split(".")
        try:
            p, number = int(tail[0]), int(tail[1])
        except (ValueError, IndexError):
            return
        if not 0 <= p < len(self._requests):
            return
        request = self._requests[p]
        if request is not None and request.number == number:
            self._requests[p] = None
        if status == "409":
            # nats-py keys the description with a str enum equal to "Description".
            description = str((msg.headers or {}).get("Description", ""))
            if "deleted" in description.lower():
                self.deleted = True
        await self._on_arrival(p)

    def drop_below(self, first_kept: Sequence[int]) -> None:
        """The stream was purged: forget what arrived of the messages before ``first_kept``
        (per partition). JetStream forgot their deliveries, so there is nothing to settle."""
        for p, (buffer, seq) in enumerate(zip(self.buffers, first_kept, strict=False)):
            if seq <= self.purged_below[p]:
                continue
            self.purged_below[p] = seq
            kept = [a for a in buffer if a.meta.stream_seq >= seq]
            buffer.clear()
            buffer.extend(kept)

    async def _on_purge(self, msg: Msg) -> None:
        try:
            first_kept = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(first_kept, list) and all(type(seq) is int for seq in first_kept):
            self.drop_below(first_kept)

    async def settle(self, reply: str, verb: bytes) -> None:
        await self._publish(reply, verb)
