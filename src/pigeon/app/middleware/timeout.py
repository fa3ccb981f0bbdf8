"""A processing deadline per handler call.

On expiry the handler is cancelled and the call fails with `HandlerTimeoutError`, which
the retry policy treats like any retryable failure (the message is nacked and redelivered
after the backoff, until the attempts run out).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ...errors import HandlerTimeoutError, InvalidConfigError
from ..context import Context
from .base import CallNext


@dataclass(frozen=True)
class Timeout:
    seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float) or self.seconds <= 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {self.seconds!r}")

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        try:
            async with asyncio.timeout(self.seconds):
                return await call_next(ctx)
        except TimeoutError as exc:
            if isinstance(exc, HandlerTimeoutError):
                raise
            raise HandlerTimeoutError(
                f"handler {ctx.subscriber.name!r} took longer than {self.seconds}s on {ctx.message!r}"
            ) from None
