"""Processing deadlines: the Timeout middleware alone, and ``App.subscriber(timeout=...)`` on
every transport (cancelled, retried, then dead-lettered as a timeout)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Context, SubscriberSpec
from pigeon.app.handler import Handler
from pigeon.app.middleware import Timeout
from pigeon.app.subscriber import Subscriber
from pigeon.errors import HandlerTimeoutError, InvalidConfigError
from pigeon.message import Headers, Message


def context() -> Context:
    """A context as a subscriber makes it, without a transport (the middleware needs none)."""
    app = App("memory://")

    async def billing(payload: bytes) -> None: ...

    subscriber = Subscriber(app, SubscriberSpec(name="billing"), Handler.of(billing, batch=False))
    return Context(app, subscriber, Message("orders.new", b"{}"))


async def test_a_call_past_the_deadline_is_cancelled_and_fails_as_a_timeout() -> None:
    cleaned_up: list[bool] = []

    async def slow(ctx: Context) -> None:
        try:
            await asyncio.sleep(5)
        finally:
            cleaned_up.append(True)

    with pytest.raises(HandlerTimeoutError, match=r"'billing' took longer than 0\.1s"):
        await asyncio.wait_for(Timeout(0.1)(context(), slow), 5)
    assert cleaned_up == [True], "the handler was cancelled, so its finally ran"


async def test_a_call_within_the_deadline_returns_its_result() -> None:
    async def quick(ctx: Context) -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await Timeout(1)(context(), quick) == "done"


async def test_a_timeout_the_handler_raises_itself_is_not_reported_as_the_deadline() -> None:
    """A client library's own TimeoutError is the handler's failure, not the deadline's."""

    async def times_out_inside(ctx: Context) -> None:
        raise TimeoutError("the database did not answer")

    with pytest.raises(TimeoutError, match="the database did not answer") as caught:
        await Timeout(5)(context(), times_out_inside)
    assert not isinstance(caught.value, HandlerTimeoutError)


async def test_an_inner_deadline_passes_through_an_outer_one() -> None:
    async def slow(ctx: Context) -> None:
        await asyncio.sleep(5)

    async def inner(ctx: Context) -> None:
        await Timeout(0.05)(ctx, slow)

    with pytest.raises(HandlerTimeoutError, match=r"0\.05s"):
        await Timeout(5)(context(), inner)


async def test_cancelling_the_caller_is_not_a_timeout() -> None:
    """A shutdown cancels the handler: that must stay a cancellation (the message is nacked)."""
    started = asyncio.Event()

    async def slow(ctx: Context) -> None:
        started.set()
        await asyncio.sleep(5)

    task = asyncio.create_task(Timeout(5)(context(), slow))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("seconds", [0, -1, True, "1", None, math.nan])
def test_a_timeout_must_be_a_positive_number(seconds: Any) -> None:
    with pytest.raises(InvalidConfigError, match="timeout"):
        Timeout(seconds)


def test_the_app_refuses_a_bad_timeout_at_registration() -> None:
    app = App("memory://")

    async def handle(payload: bytes) -> None: ...

    with pytest.raises(InvalidConfigError, match="timeout"):
        app.subscriber(stream="s", group="g", timeout=0)(handle)


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    make_stream.created += [f"{stream}-g-retry", f"{stream}-g-dlq"]
    app = App(any_transport)
    attempts: list[int] = []
    cancelled: list[int] = []

    @app.subscriber(stream=stream, group="g", timeout=0.2, retry=fast_retry(2), ack_wait_s=5)
    async def handle(text: str, ctx: Context) -> None:
        attempts.append(ctx.received.delivery_count if ctx.received else 0)
        try:
            await asyncio.sleep(5)
        finally:
            cancelled.append(ctx.attempt)

    async with app:
        await app.publish(f"{prefix}.x", "slow")
        letters = await dead_letters(any_transport, stream, "g", 1)
        assert await until(lambda: len(cancelled) == 2)
    assert attempts == [1, 2], "nacked after the first timeout, redelivered once"
    assert cancelled == [1, 2], "each attempt was cancelled at its deadline"
    (letter,) = letters
    assert letter.payload == b"slow"
    assert letter.headers[Headers.ERROR_TYPE] == "HandlerTimeoutError"
    assert "took longer than 0.2s" in letter.headers[Headers.ERROR_MESSAGE]
