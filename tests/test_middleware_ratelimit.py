"""The RateLimit middleware alone: a token bucket whose callers wait for a token.

Timing assertions are lower bounds (a loaded machine is slower, never faster), except where a
call must not wait at all, which is checked against a bound hundreds of times the real cost.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from pigeon.app import App, Context, SubscriberSpec
from pigeon.app.handler import Handler
from pigeon.app.middleware import RateLimit
from pigeon.app.subscriber import Subscriber
from pigeon.errors import InvalidConfigError
from pigeon.message import Message


def context() -> Context:
    app = App("memory://")

    async def billing(payload: bytes) -> None: ...

    subscriber = Subscriber(app, SubscriberSpec(name="billing"), Handler.of(billing, batch=False))
    return Context(app, subscriber, Message("orders.new", b"{}"))


async def test_calls_beyond_the_burst_wait_for_their_tokens() -> None:
    limit = RateLimit(per_second=20, burst=1)
    begun = time.monotonic()
    for _ in range(11):
        await limit.acquire()
    assert time.monotonic() - begun >= 0.5 * 0.98  # 10 tokens after the first, 50 ms apart


async def test_a_burst_is_served_at_once_and_the_next_call_waits() -> None:
    limit = RateLimit(per_second=0.1, burst=3)  # one token per 10 s after the burst
    await asyncio.wait_for(asyncio.gather(*(limit.acquire() for _ in range(3))), 5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limit.acquire(), 0.3)


async def test_idle_time_refills_only_up_to_the_burst() -> None:
    limit = RateLimit(per_second=20, burst=2)
    await asyncio.sleep(0.5)  # worth 10 tokens, capped at 2
    begun = time.monotonic()
    for _ in range(6):
        await limit.acquire()
    assert time.monotonic() - begun >= 0.2 * 0.98  # 4 tokens beyond the burst, 50 ms apart


async def test_concurrent_callers_share_the_bucket() -> None:
    limit = RateLimit(per_second=20, burst=1)
    begun = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(limit.acquire() for _ in range(11))), 10)
    assert time.monotonic() - begun >= 0.5 * 0.98


async def test_as_middleware_it_waits_then_returns_the_handlers_result() -> None:
    limit = RateLimit(per_second=10, burst=1)
    calls: list[float] = []

    async def handler(ctx: Context) -> str:
        calls.append(time.monotonic())
        return ctx.message.subject

    ctx = context()
    assert [await limit(ctx, handler) for _ in range(3)] == ["orders.new"] * 3
    assert calls[-1] - calls[0] >= 0.2 * 0.98


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"per_second": 0}, "per second"),
        ({"per_second": -5}, "per second"),
        ({"per_second": True}, "per second"),
        ({"per_second": "10"}, "per second"),
        ({"per_second": math.nan}, "per second"),
        ({"per_second": 10, "burst": 0}, "burst"),
        ({"per_second": 10, "burst": 1.5}, "burst"),
        ({"per_second": 10, "burst": True}, "burst"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        RateLimit(**kwargs)
