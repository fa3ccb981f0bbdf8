"""Flow control: how much a subscriber holds at once, and how it groups messages into batches.

Without a bound a consumer can pull 10,000 messages into memory while its handler works on
the first. A subscriber fetches only while it holds fewer than ``max_in_flight`` messages
and ``max_in_flight_bytes`` payload bytes (fetched and not yet settled); a fetch asks for
no more than the room left, so the count bound is exact and the byte bound is exceeded by
at most one fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from ..errors import InvalidConfigError


def _positive(owner: str, name: str, value: object, kind: type | tuple[type, ...] = int) -> None:
    # `not value > 0` also refuses NaN, which no comparison with 0 catches otherwise.
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:  # type: ignore[operator]
        raise InvalidConfigError(f"{owner}: {name} must be positive, not {value!r}")


@dataclass(frozen=True)
class Flow:
    """``concurrency``: handler calls at once (an ordered group also keeps one call per
    partition at a time, so order holds). ``fetch_batch``: most messages asked per fetch."""

    concurrency: int = 1
    max_in_flight: int = 100
    max_in_flight_bytes: int = 16 * 1024 * 1024
    fetch_batch: int = 100

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_in_flight", "max_in_flight_bytes", "fetch_batch"):
            _positive("flow", name, getattr(self, name))


@dataclass(frozen=True)
class Batch:
    """Call a batch handler with up to ``max_messages``, or with what arrived within
    ``max_wait_s`` of the first one."""

    max_messages: int = 100
    max_wait_s: float = 0.05

    def __post_init__(self) -> None:
        _positive("batch", "max_messages", self.max_messages)
        _positive("batch", "max_wait_s", self.max_wait_s, (int, float))


class InFlight:
    """Counts what a subscriber holds; `room` says how much more it may fetch."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.messages = 0
        self.bytes = 0
        self.peak_messages = 0
        self._freed = asyncio.Event()

    def room(self) -> int:
        if self.bytes >= self.flow.max_in_flight_bytes:
            return 0
        return max(0, min(self.flow.fetch_batch, self.flow.max_in_flight - self.messages))

    def take(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        self.peak_messages = max(self.peak_messages, self.messages)

    def release(self, size: int) -> None:
        self.messages -= 1
        self.bytes -= size
        self._freed.set()

    async def wait_for_room(self, timeout: float) -> None:
        self._freed.clear()
        if self.room():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), timeout)
