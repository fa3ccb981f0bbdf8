"""What every workload sends, and the small helpers the workloads and the backlog child share."""

from __future__ import annotations

import asyncio

from .systems.base import Durable

PAYLOAD_BYTES = 100
PAYLOAD = b"x" * PAYLOAD_BYTES
_STAMP_DIGITS = 20
_FILLER = b"x" * (PAYLOAD_BYTES - _STAMP_DIGITS)
FILL_CHUNK = 1000  # messages per publish_many when filling or pipelining


def stamped(ns: int) -> bytes:
    return b"%020d" % ns + _FILLER


def stamp_of(payload: bytes) -> int:
    return int(payload[:_STAMP_DIGITS])


class Counter:
    """Counts deliveries and says when ``expected`` arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.done = asyncio.Event()

    def __call__(self, _payload: bytes) -> None:
        self.seen += 1
        if self.seen >= self.expected:
            self.done.set()

    def check(self, what: str) -> None:
        if self.seen != self.expected:
            raise RuntimeError(f"{what}: {self.seen} messages arrived, expected {self.expected}")


async def fill(queue: Durable, count: int) -> None:
    for start in range(0, count, FILL_CHUNK):
        await queue.publish_many([PAYLOAD] * min(FILL_CHUNK, count - start))
