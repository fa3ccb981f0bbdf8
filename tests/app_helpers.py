"""Small helpers for the application-layer tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pigeon.app import RetryPolicy
from pigeon.engine.groups.config import Backoff
from pigeon.message import Message
from pigeon.transport.base import Transport


async def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait until ``check()`` holds; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def dead_letters(
    transport: Transport, stream: str, group: str, count: int, timeout: float = 10.0
) -> list[Message]:
    """The group's dead letters once there are ``count`` of them (fewer after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        letters = await transport.read_dead_letters(stream, group)
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.05)


def fast_retry(attempts: int = 3, strategy: str = "auto", delay: float = 0.05, **kw: object) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=attempts,
        backoff=Backoff(initial_s=delay, multiplier=1.0, max_s=delay, jitter=0),
        strategy=strategy,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
