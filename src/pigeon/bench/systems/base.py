"""What a system adapter provides: a durable queue, optionally core messaging, and where it lives.

The workloads (`pigeon.bench.workloads`) do the timing; an adapter only speaks its system's
client library as its users would. Every durable channel and core channel gets a name of its
own and removes what it created on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

Kind = Literal["pigeon", "networked", "in-process", "floor"]
OnPayload = Callable[[bytes], None]


class Unreachable(Exception):
    """The system's service cannot be reached or started: its whole column is an error."""


@dataclass(frozen=True)
class Where:
    """How to reach a system: a URL or folder (also handed to the backlog child process), and
    the pid of the server process the harness started for it, if any."""

    address: str
    server_pid: int | None = None


class Durable(ABC):
    """One fresh queue or stream."""

    @abstractmethod
    async def publish(self, payload: bytes) -> None:
        """Store one message and wait until the system confirms it is stored."""

    @abstractmethod
    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        """Store these, many in flight (or one batch), and wait for every confirmation."""

    @abstractmethod
    async def consume(self, count: int, on_payload: OnPayload) -> None:
        """Take ``count`` messages, acknowledging each one before the next counts as consumed."""

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        """Take ``count`` messages in order, committing the position once per batch.
        Only called when the system does not list ``consume_ordered_batch`` as unsupported."""
        raise NotImplementedError


class Core(ABC):
    """Core (non-durable) messaging on one fresh subject or channel."""

    @abstractmethod
    async def subscribe(self, on_payload: OnPayload) -> None:
        """Subscribe; return once a message published after this is sure to arrive."""

    @abstractmethod
    async def publish(self, payload: bytes) -> None: ...

    async def flush(self) -> None:  # noqa: B027 (optional: most clients do not buffer)
        """Push out what ``publish`` buffered."""

    async def serve_echo(self) -> None:
        """Answer every request on the channel with its own payload (for ``request``).
        Only called when the system does not list ``request_reply`` as unsupported."""
        raise NotImplementedError

    async def request(self, payload: bytes) -> bytes:
        raise NotImplementedError


class System(ABC):
    name: ClassVar[str]
    title: ClassVar[str]  # what it is and through which client, for the table
    kind: ClassVar[Kind]
    # workload -> why this system does not have it; reported as null with the reason
    unsupported: ClassVar[dict[str, str]] = {}
    # Whose peak RSS the backlog figure is: the benchmark process or the server the harness ran.
    backlog_rss: ClassVar[Literal["client", "server"]] = "client"
    # The machine's service this system uses, if it is one; PIGEON_BENCH_<NAME>_URL overrides it.
    service_url: ClassVar[str | None] = None

    def __init__(self, where: Where) -> None:
        self.where = where

    @classmethod
    @contextlib.asynccontextmanager
    async def provision(cls, scratch: Path) -> AsyncIterator[Where]:
        """Make the system reachable for the run (start a server, find the service) and undo
        that afterwards. By default: the service's URL, else a folder of its own under ``scratch``."""
        if cls.service_url is not None:
            yield Where(os.environ.get(f"PIGEON_BENCH_{cls.name.upper()}_URL", cls.service_url))
            return
        folder = scratch / cls.name
        folder.mkdir()
        yield Where(str(folder))

    async def open(self) -> None:  # noqa: B027 (optional: in-process systems open lazily)
        """Connect; raise `Unreachable` when the system is not there."""

    async def close(self) -> None:  # noqa: B027 (optional, as open)
        """Disconnect."""

    @abstractmethod
    def durable(self) -> contextlib.AbstractAsyncContextManager[Durable]: ...

    def core(self) -> contextlib.AbstractAsyncContextManager[Core]:
        """Only called when the system does not list ``pubsub`` as unsupported."""
        raise NotImplementedError


def fresh_name(prefix: str = "pigeon_bench") -> str:
    """A name no other run uses (letters, digits and underscores: valid everywhere)."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


class Background:
    """Tasks a core channel runs (subscribers, responders), cancelled when it closes."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.ensure_future(work))

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
