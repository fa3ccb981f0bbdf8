"""The idempotency store contract: claim a message's key for a scope before handling it.

A consumer enters ``store.claim(message_id, scope=group)`` around its handler. A key claimed
and committed before is a duplicate: the handler is skipped and the message acknowledged.
The scope is the consumer group, so two groups handling the same message never dedupe each
other.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidConfigError, InvalidIdempotencyKeyError

MAX_KEY_LENGTH = 255


@dataclass
class Claim:
    """What ``claim`` found.

    ``duplicate``: the (scope, key) was processed before; skip the handler and acknowledge.
    ``session``: with a SQL store, the SQLAlchemy ``AsyncSession`` whose open transaction
    holds the claim. The handler writes in it, so its writes and the claim commit (or roll
    back) together. ``None`` for a duplicate and for stores that are not transactional.
    """

    duplicate: bool
    session: Any = None


class IdempotencyStore(ABC):
    """Records which messages each scope has processed."""

    @abstractmethod
    def claim(self, key: str, *, scope: str) -> AbstractAsyncContextManager[Claim]:
        """``async with store.claim(key, scope=group) as claim:`` around the handler.

        On normal exit the claim (and a SQL store's session writes) is committed. On an
        exception nothing is recorded, so a redelivery processes the message again; the
        exception propagates. When ``claim.duplicate`` is true, exiting does nothing.
        """

    @abstractmethod
    async def forget_older_than(self, seconds: float) -> int:
        """Delete the marks recorded more than ``seconds`` ago; returns how many were deleted."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connections the store opened itself."""


def validate_claim(key: object, scope: object) -> None:
    for what, value in (("key", key), ("scope", scope)):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH:
            found = f"{len(value)} characters" if isinstance(value, str) else repr(value)
            raise InvalidIdempotencyKeyError(
                f"idempotency {what} must be text of 1 to {MAX_KEY_LENGTH} characters, not {found}"
            )


def validate_seconds(seconds: object, what: str, *, positive: bool = False) -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds < 0
        or (positive and seconds == 0)
    ):
        sign = "positive" if positive else "non-negative"
        raise InvalidConfigError(f"{what} must be a finite, {sign} number of seconds, not {seconds!r}")
    return float(seconds)
