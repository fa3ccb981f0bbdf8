"""AMQP channels, and the mapping of client errors to pigeon's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from ...errors import PigeonError, TransportClosedError


class Chan:
    """An aio-pika channel and the aiormq channel under it.

    Per-message work (publish, consume, ack) goes straight to aiormq: it hands over the raw
    frames without building a wrapper object per message, and its consumer callbacks run in
    delivery order.
    """

    __slots__ = ("outer", "raw")

    def __init__(self, outer: aio_pika.abc.AbstractChannel, raw: aiormq.abc.AbstractChannel) -> None:
        self.outer = outer
        self.raw = raw

    @property
    def closed(self) -> bool:
        return bool(self.raw.is_closed)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.outer.close()


ChanFactory = Callable[[], Awaitable[Chan]]


async def open_chan(
    connection: aio_pika.abc.AbstractConnection, *, confirms: bool = False, returns: bool = False
) -> Chan:
    try:
        outer = await connection.channel(publisher_confirms=confirms, on_return_raises=returns)
        return Chan(outer, await outer.get_underlay_channel())
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
        raise TransportClosedError(f"cannot open an AMQP channel: {error!r}") from None


def is_connection_error(error: BaseException) -> bool:
    return isinstance(
        error,
        aiormq.exceptions.AMQPConnectionError
        | aiormq.exceptions.ChannelInvalidStateError
        | ConnectionError
        | aiormq.exceptions.ConnectionClosed,
    )


def unexpected(error: BaseException, what: str) -> PigeonError:
    """A pigeon error for a client error nobody's input caused."""
    if is_connection_error(error):
        return TransportClosedError(f"{what}: the AMQP connection or channel is closed ({error!r})")
    return PigeonError(f"{what}: RabbitMQ refused it ({error!r})")


async def cancel_quietly(chan: Chan, tag: str) -> None:
    """Cancel a consumer; a closed channel has cancelled it already."""
    if chan.closed:
        return
    with contextlib.suppress(
        aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError, RuntimeError
    ):
        await chan.raw.basic_cancel(tag)
