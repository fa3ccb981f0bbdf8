"""A rate limit: at most ``per_second`` handler calls per second, with bursts up to ``burst``.

A token bucket shared by every call of the handler it is attached to: calls wait for a
token rather than fail, so the subscriber slows down and its flow control stops fetching.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ...errors import InvalidConfigError
from ..context import Context
from .base import CallNext


class RateLimit:
    def __init__(self, per_second: float, burst: int = 1) -> None:
        # `not per_second > 0` also refuses NaN, which no comparison with 0 catches otherwise.
        if isinstance(per_second, bool) or not isinstance(per_second, int | float) or not per_second > 0:
            raise InvalidConfigError(f"rate limit must be a positive number per second, not {per_second!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise InvalidConfigError(f"rate limit burst must be a positive integer, not {burst!r}")
        self.per_second = float(per_second)
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # one waiter at a time keeps the order fair
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.per_second)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.per_second)

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        await self.acquire()
        return await call_next(ctx)
