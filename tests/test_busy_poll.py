"""The busy-poll selector: spins after a poll that found work, sleeps after one that did not,
keeps the loop's timeouts, and hands over what arrives while it spins."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pigeon.errors import InvalidConfigError
from pigeon.server.busy_poll import MAX_BUSY_POLL_US, BusyPollSelector, loop_factory

Pair = tuple[socket.socket, socket.socket]
WINDOW_US = MAX_BUSY_POLL_US  # long enough to tell spinning from sleeping by the CPU time it takes
# Spinning shows as CPU time only while this process has a CPU; on a shared machine it may
# lose it for a while, so the tests that expect spinning take the best of a few tries.
TRIES = 3


@pytest.fixture
def pair() -> Iterator[Pair]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def busy_selector(window_us: int, reader: socket.socket, writer: socket.socket) -> BusyPollSelector:
    """A selector watching ``reader`` whose last poll found something (and was drained)."""
    selector = BusyPollSelector(window_us)
    selector.register(reader, selectors.EVENT_READ)
    writer.send(b"x")
    assert selector.select(1.0)
    reader.recv(16)
    return selector


def cpu_and_wall(poll: selectors.BaseSelector, timeout: float | None) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.monotonic()
    ready = poll.select(timeout)
    return time.process_time() - cpu, time.monotonic() - wall, len(ready)


def test_after_a_busy_poll_it_spins_for_the_window_then_waits(pair: Pair) -> None:
    attempts = []
    for _ in range(TRIES):
        selector = busy_selector(WINDOW_US, *pair)
        cpu, wall, found = cpu_and_wall(selector, 0.2)
        selector.close()
        assert found == 0 and wall >= 0.19
        assert cpu <= 0.1, cpu  # the rest of the timeout was slept
        attempts.append(cpu)
    assert max(attempts) >= 0.005, attempts


def test_after_an_idle_poll_it_sleeps_at_once(pair: Pair) -> None:
    selector = busy_selector(WINDOW_US, *pair)
    assert selector.select(0.05) == []  # a poll that found nothing: idle from here on
    cpu, wall, found = cpu_and_wall(selector, 0.1)
    assert found == 0 and wall >= 0.09 and cpu < 0.003, cpu
    selector.close()


def test_without_a_window_it_never_spins(pair: Pair) -> None:
    selector = busy_selector(0, *pair)
    cpu, _, found = cpu_and_wall(selector, 0.1)
    assert found == 0 and cpu < 0.003, cpu
    selector.close()


def test_a_timeout_shorter_than_the_window_is_kept(pair: Pair) -> None:
    selector = busy_selector(MAX_BUSY_POLL_US, *pair)
    _, wall, found = cpu_and_wall(selector, 0.002)
    assert found == 0 and wall < 0.008, wall
    selector.close()


def test_callbacks_waiting_keep_it_busy(pair: Pair) -> None:
    """The loop polls with timeout 0 while callbacks wait: finding nothing then is not idleness."""
    attempts = []
    for _ in range(TRIES):
        selector = busy_selector(WINDOW_US, *pair)
        assert selector.select(0) == []
        attempts.append(cpu_and_wall(selector, 0.1)[0])
        selector.close()
    assert max(attempts) >= 0.005, attempts


def test_what_arrives_while_it_spins_is_returned_at_once(pair: Pair) -> None:
    reader, writer = pair
    selector = busy_selector(MAX_BUSY_POLL_US, reader, writer)
    sender = threading.Timer(0.003, writer.send, args=(b"y",))
    sender.start()
    _, wall, found = cpu_and_wall(selector, None)
    sender.join()
    assert found == 1 and wall < MAX_BUSY_POLL_US / 1e6
    assert reader.recv(16) == b"y"
    selector.close()


@pytest.mark.parametrize("window_us", [-1, MAX_BUSY_POLL_US + 1])
def test_a_window_out_of_range_is_refused(window_us: int) -> None:
    with pytest.raises(InvalidConfigError, match="busy poll must be 0 to 10000 microseconds"):
        BusyPollSelector(window_us)
    with pytest.raises(InvalidConfigError):
        loop_factory(window_us)


def test_an_event_loop_runs_on_it(pair: Pair) -> None:
    reader, writer = pair

    async def echo_once() -> bytes:
        loop = asyncio.get_running_loop()
        writer.setblocking(False)
        reader.setblocking(False)
        await loop.sock_sendall(writer, b"ping")
        return await loop.sock_recv(reader, 16)

    with asyncio.Runner(loop_factory=loop_factory(500)) as runner:
        assert runner.run(echo_once()) == b"ping"
        loop = runner.get_loop()
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert isinstance(loop._selector, BusyPollSelector)  # type: ignore[attr-defined]
