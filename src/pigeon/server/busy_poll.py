"""Busy polling: the event loop keeps polling for a while before it sleeps, trading CPU for latency.

On a virtual machine, waking a process that sleeps in ``epoll_wait`` costs tens of microseconds:
the idle virtual CPU has to be woken through the hypervisor. That is more than ``pigeon serve``
spends on a JetStream publish, and a client that waits for each answer pays it on every
request. With a busy-poll window, after a poll that found something to do the loop polls without
sleeping for up to the window, so a request that follows within it is read at once. Polls that
found nothing (a timer's wake-up, an idle server) are not followed by spinning, so an idle
server costs no CPU; a steady trickle of requests spaced just over the window costs at most one
CPU's time. Linux's ``SO_BUSY_POLL`` and KVM's halt polling make the same trade one layer down.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable

from ..errors import InvalidConfigError

__all__ = ["MAX_BUSY_POLL_US", "BusyPollSelector", "check_busy_poll", "loop_factory"]

MAX_BUSY_POLL_US = 10_000  # beyond this the CPU spent buys no latency worth having


class BusyPollSelector(selectors.DefaultSelector):
    """The platform's selector, polling up to ``window_us`` without sleeping after a busy poll."""

    def __init__(self, window_us: int) -> None:
        check_busy_poll(window_us)
        super().__init__()
        self._window_s = window_us / 1e6
        self._busy = False  # the loop found work since its last poll that waited

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            # The loop has callbacks waiting: it is busy whatever this poll finds.
            ready = super().select(0)
            self._busy = self._busy or bool(ready)
            return ready
        if self._busy and self._window_s:
            ready = self._spin(self._window_s if timeout is None else min(self._window_s, timeout))
            if ready:
                return ready
            if timeout is not None:
                timeout = max(0.0, timeout - self._window_s)
        ready = super().select(timeout)
        self._busy = bool(ready)
        return ready

    def _spin(self, window_s: float) -> list[tuple[selectors.SelectorKey, int]]:
        deadline = time.monotonic() + window_s
        while True:
            ready = super().select(0)
            if ready or time.monotonic() >= deadline:
                return ready


def loop_factory(busy_poll_us: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """Makes the event loops ``pigeon serve`` runs on (for :class:`asyncio.Runner`)."""
    check_busy_poll(busy_poll_us)
    if busy_poll_us == 0:
        return asyncio.new_event_loop
    return lambda: asyncio.SelectorEventLoop(BusyPollSelector(busy_poll_us))


def check_busy_poll(busy_poll_us: int) -> None:
    if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
        raise InvalidConfigError(
            f"busy poll must be 0 to {MAX_BUSY_POLL_US} microseconds, not {busy_poll_us}"
        )
