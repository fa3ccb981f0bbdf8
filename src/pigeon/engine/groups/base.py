"""What ordered and shared groups have in common: their stream, state log, wake-ups, dead letters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ...errors import AlreadySettledError, DeliveryNotOwnedError, InvalidConfigError, PigeonError
from ...message import Message
from ..stream import Stream
from .config import OrderedGroupConfig, SharedGroupConfig
from .deadletter import Failures, dead_letter_message
from .delivery import Delivery
from .statelog import StateLog

DeadLetterSink = Callable[[Message], Awaitable[None]]

MAX_NACK_DELAY_S = 365 * 24 * 3600.0


def check_fetch(max_messages: object, timeout: object, max_bytes: object = None) -> None:
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
        raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
    ):
        raise InvalidConfigError(f"max_bytes must be a positive integer or None, not {max_bytes!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise InvalidConfigError(f"timeout must be a non-negative number of seconds, not {timeout!r}")


def check_nack_delay(delay: object) -> None:
    if delay is None:
        return
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_NACK_DELAY_S:
        raise InvalidConfigError(
            f"nack delay must be between 0 and {MAX_NACK_DELAY_S:.0f} seconds, not {delay!r}"
        )


class GroupBase:
    def __init__(
        self,
        stream: Stream,
        config: OrderedGroupConfig | SharedGroupConfig,
        state: StateLog,
        dead_letters: DeadLetterSink | None,
        dead_letter_subject: str,
    ) -> None:
        self.stream = stream
        self.name = config.name
        self._state = state
        self._dead_letters = dead_letters
        self._dead_letter_subject = dead_letter_subject
        self._failures: dict[tuple[int, int], Failures] = {}
        self._wakeup = asyncio.Event()
        self._waiting = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        for partition in stream.partitions:
            partition.append_listeners.append(self._wake)

    def _wake(self) -> None:
        """Wake every member waiting for something to fetch (data, acks, assignments)."""
        if self._waiting:
            self._wakeup.set()
            self._wakeup = asyncio.Event()

    async def _wait(self, deadline: float) -> bool:
        """Wait for a wake-up until ``deadline`` (monotonic); False when the time is up."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._waiting += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives in the same step as the wake-up, and a cancelled fetch must stop.
            async with asyncio.timeout(remaining):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
        return True

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _note_failure(self, delivery: Delivery, error: BaseException | str | None) -> Failures:
        key = (delivery.partition, delivery.offset)
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = Failures()
        failures.note(error, time.time())
        return failures

    async def _send_to_dead_letters(self, delivery: Delivery, failures: Failures) -> None:
        await self._send_dead_letter(delivery.message, delivery.delivery_count, failures)

    async def _send_dead_letter(self, message: Message, delivery_count: int, failures: Failures) -> None:
        if self._dead_letters is not None:
            await self._dead_letters(
                dead_letter_message(message, self.name, delivery_count, failures, self._dead_letter_subject)
            )
        self._failures.pop((message.partition, message.offset), None)  # type: ignore[arg-type]

    @staticmethod
    def _check_settle(delivery: Delivery, current_lease: int | None) -> None:
        if delivery.settled:
            raise AlreadySettledError(f"{delivery!r} was settled already")
        if current_lease != delivery.lease or delivery.is_cancelled():
            raise DeliveryNotOwnedError(
                f"{delivery!r} is no longer held by its member (lease expired or partition revoked)"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise PigeonError(f"group {self.name!r} on stream {self.stream.name!r} is closed")

    async def close(self) -> None:
        self._closed = True
        for partition in self.stream.partitions:
            if self._wake in partition.append_listeners:
                partition.append_listeners.remove(self._wake)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._wake()
        await self._state.close()
