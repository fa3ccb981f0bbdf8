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
        seconds = self.seconds
        # `not seconds > 0` also refuses NaN, which no comparison with 0 catches otherwise.
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {seconds!r}")

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        deadline = asyncio.timeout(self.seconds)
        try:
            async with deadline:
                return await call_next(ctx)
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own (a client library's, an inner deadline's): not ours
            raise HandlerTimeoutError(
                f"handler {ctx.subscriber.name!r} took longer than {self.seconds}s on {ctx.message!r}"
            ) from None
