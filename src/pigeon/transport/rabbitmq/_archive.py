"""Reading a stream's partitions: RabbitMQ stream queues, through AMQP 0-9-1.

A consumer of a stream queue names where it starts (``x-stream-offset``: ``first``,
``last``, an offset or a timestamp) and gets every message from there with its offset in
the ``x-stream-offset`` header; acks only grant credit. Streams are read in chunks, so a
consumer can be handed messages from just before its start: readers skip them. AMQP cannot
ask where a stream ends (``queue.declare`` reports 0 messages), so the end is found by
reading the last chunk (``last``) until it stops coming; silence for ``timeout`` means the
stream is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiormq.abc import DeliveredMessage

from ._channel import Chan, ChanFactory, cancel_quietly

# Once the last chunk starts arriving, this much silence says it is complete.
_CHUNK_GAP_S = 0.03
# ... and a stream written to without pause is not waited on for longer than this.
_MAX_PROBE_S = 1.0


def offset_of(delivered: DeliveredMessage) -> int:
    value = (delivered.header.properties.headers or {}).get("x-stream-offset")
    return value if isinstance(value, int) else -1


async def probe(open_chan: ChanFactory, queue: str, where: str, timeout: float) -> int:
    """The offset of the first (``where="first"``) or last (``"last"``) message; -1 when empty."""
    chan = await open_chan()
    try:
        found = -1
        pick = min if where == "first" else max
        arrived = asyncio.Event()

        async def on_message(delivered: DeliveredMessage) -> None:
            nonlocal found
            offset = offset_of(delivered)
            found = offset if found == -1 else pick(found, offset)
            arrived.set()
            if delivered.delivery_tag is not None and not chan.closed:
                await chan.raw.basic_ack(delivered.delivery_tag, wait=False)

        await chan.raw.basic_qos(prefetch_count=1 if where == "first" else 2000)
        ok = await chan.raw.basic_consume(queue, on_message, arguments={"x-stream-offset": where})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await arrived.wait()
        if arrived.is_set() and where == "last":
            # The rest of the chunk follows at once: wait for a gap in the deliveries.
            started = time.monotonic()
            while time.monotonic() - started < _MAX_PROBE_S:
                arrived.clear()
                try:
                    async with asyncio.timeout(_CHUNK_GAP_S):
                        await arrived.wait()
                except TimeoutError:
                    break
        await cancel_quietly(chan, ok.consumer_tag or "")
        return found
    finally:
        await chan.close()


async def last(open_chan: ChanFactory, queue: str, timeout: float) -> DeliveredMessage | None:
    """The last message of a stream queue, None when it is empty."""
    chan = await open_chan()
    try:
        found: DeliveredMessage | None = None
        arrived = asyncio.Event()

        async def on_message(delivered: DeliveredMessage) -> None:
            nonlocal found
            if found is None or offset_of(delivered) > offset_of(found):
                found = delivered
            arrived.set()
            if delivered.delivery_tag is not None and not chan.closed:
                await chan.raw.basic_ack(delivered.delivery_tag, wait=False)

        await chan.raw.basic_qos(prefetch_count=100)
        ok = await chan.raw.basic_consume(queue, on_message, arguments={"x-stream-offset": "last"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await arrived.wait()
        started = time.monotonic()
        while arrived.is_set() and time.monotonic() - started < _MAX_PROBE_S:
            arrived.clear()
            try:
                async with asyncio.timeout(_CHUNK_GAP_S):
                    await arrived.wait()
            except TimeoutError:
                break
        await cancel_quietly(chan, ok.consumer_tag or "")
        return found
    finally:
        await chan.close()


async def read(
    open_chan: ChanFactory,
    queue: str,
    start: int | float,
    stop: int,
    handle: Callable[[DeliveredMessage, int], Awaitable[bool]],
    *,
    quiet_s: float,
    prefetch: int = 500,
) -> None:
    """Feed the messages with offsets ``start``..``stop`` to ``handle`` in order, until it
    returns False. A float ``start`` is a time: reading begins at its chunk and the caller
    filters. Stops early after ``quiet_s`` without a message (retention removed the rest)."""
    if stop < 0 or (isinstance(start, int) and stop < start):
        return
    chan: Chan = await open_chan()
    try:
        inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        await chan.raw.basic_qos(prefetch_count=prefetch)
        where: int | datetime = start if isinstance(start, int) else datetime.fromtimestamp(int(start), UTC)
        ok = await chan.raw.basic_consume(queue, inbox.put, arguments={"x-stream-offset": where})
        first = start if isinstance(start, int) else 0
        unacked = 0
        while True:
            try:
                async with asyncio.timeout(quiet_s):
                    delivered = await inbox.get()
            except TimeoutError:
                break
            unacked += 1
            if unacked >= prefetch // 2 and delivered.delivery_tag is not None:
                # This channel holds this one consumer only: ack everything so far at once.
                await chan.raw.basic_ack(delivered.delivery_tag, multiple=True)
                unacked = 0
            offset = offset_of(delivered)
            if offset < first:
                continue
            if offset > stop or not await handle(delivered, offset):
                break
            if offset == stop:
                break
        await cancel_quietly(chan, ok.consumer_tag or "")
    finally:
        await chan.close()
