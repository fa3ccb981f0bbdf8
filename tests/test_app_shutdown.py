"""Graceful shutdown: running handlers finish or are cancelled at the deadline, nothing is lost.

Every test checks the same at-least-once contract from the outside: a second App on the same
group gets exactly the messages the first one did not finish. Both apps use ``ack_wait_s=30``,
so a message that comes back within the tests' waits was handed back by the stopping app
(nacked), not rescued by its lease running out.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import app_shutdown_worker as worker
from app_helpers import until
from pigeon.app import App, Context, Flow, RetryPolicy
from pigeon.engine.groups.config import Backoff
from pigeon.transport import StreamSpec, connect
from pigeon.transport.base import GroupKind, Transport
from pigeon.transport.embedded import EmbeddedOptions

GROUP = "g"
HELD = 10  # messages each test has its app hold when it stops


def subscribe(
    app: App, stream: str, handler: Any, *, concurrency: int = 1, kind: GroupKind = "shared"
) -> None:
    """The same group settings for every app of a test (some engines refuse a different join)."""
    app.subscriber(
        stream=stream,
        group=GROUP,
        kind=kind,
        ack_wait_s=30,
        retry=RetryPolicy(max_attempts=10, backoff=Backoff(initial_s=0.05, jitter=0)),
        flow=Flow(concurrency=concurrency, max_in_flight=HELD),
    )(handler)


async def second_app(
    transport: Transport, stream: str, count: int, *, concurrency: int = 1, kind: GroupKind = "shared"
) -> list[tuple[str, int]]:
    """(payload, attempt) of what a new app on the group gets: ``count`` messages, then a
    moment more so that anything else it would get shows up too."""
    got: list[tuple[str, int]] = []
    app = App(transport)

    async def handle(text: str, ctx: Context) -> None:
        got.append((text, ctx.attempt))

    subscribe(app, stream, handle, concurrency=concurrency, kind=kind)
    async with app:
        assert await until(lambda: len(got) >= count, timeout=10), f"expected {count}, got {got}"
        await asyncio.sleep(0.2)
    return got


async def test_a_running_handler_finishes_and_is_acked_and_nothing_more_is_fetched(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def handle(text: str) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 10)
        finished.append(text)

    subscribe(app, stream, handle)
    await app.start()
    try:
        await app.publish(f"{prefix}.x", "running")
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.create_task(app.stop(timeout_s=10))
        await asyncio.sleep(0.1)
        # Published while the app stops: it must not fetch it any more.
        await app.transport.publish(f"{prefix}.x", b"late")
        release.set()
        await asyncio.wait_for(stopping, 15)
    finally:
        await app.stop(timeout_s=0.5)  # when an assertion came first
    assert finished == ["running"], "the running handler completed within the deadline"
    assert [text for text, _ in await second_app(any_transport, stream, 1)] == ["late"], (
        "the finished message was acknowledged; the late one waits for the next app"
    )


@pytest.mark.parametrize("kind", ["shared", "ordered"])
async def test_a_handler_past_the_deadline_is_cancelled_and_what_it_held_comes_back(
    any_transport: Any, make_stream: Any, kind: GroupKind
) -> None:
    """One lane, stuck past the deadline, with the rest of the fetch queued behind it: the
    handler is cancelled and its message nacked, and the queued ones are handed back too,
    not left to their leases."""
    stream, prefix = await make_stream()
    app = App(any_transport)
    calls: list[str] = []
    cancelled: list[str] = []

    async def handle(text: str) -> None:
        calls.append(text)
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.append(text)

    subscribe(app, stream, handle, kind=kind)
    every = [f"m{i}" for i in range(HELD)]
    for text in every:
        await app.transport.publish(f"{prefix}.x", text.encode())
    await app.start()
    try:
        subscriber = app.subscribers[0]
        # An ordered group hands out one batch per partition until it is settled: only some may come.
        assert await until(lambda: subscriber.in_flight.messages >= 2 and len(calls) == 1)
        await asyncio.sleep(0.2)
    finally:
        begun = time.monotonic()
        await asyncio.wait_for(app.stop(timeout_s=0.3), 10)
    assert time.monotonic() - begun < 5, "stop waited for the handler instead of its deadline"
    assert cancelled == calls, "the handler was cancelled (its finally ran) and nothing else started"
    got = await second_app(any_transport, stream, HELD, kind=kind)
    assert sorted(text for text, _ in got) == every
    # At least 2, not exactly: RabbitMQ may count one delivery more when a member leaves (3 here).
    assert dict(got)[calls[0]] >= 2, "nacked, so delivered again"
    if kind == "ordered":
        assert [text for text, _ in got] == every, "a rewind keeps the order"


async def test_only_finished_messages_are_acked(any_transport: Any, make_stream: Any) -> None:
    """Two lanes: one handler finishes during the stop, one outlives the deadline, eight
    fetched messages wait. Exactly the nine unfinished ones reach the next app."""
    stream, prefix = await make_stream()
    app = App(any_transport)
    release = asyncio.Event()
    calls: list[str] = []
    finished: list[str] = []
    cancelled: list[str] = []

    async def handle(text: str) -> None:
        calls.append(text)
        try:
            if len(calls) == 1:
                await asyncio.wait_for(release.wait(), 10)
            else:
                await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(text)
            raise
        finished.append(text)

    subscribe(app, stream, handle, concurrency=2)
    every = {f"m{i}" for i in range(HELD)}
    for text in sorted(every):
        await app.transport.publish(f"{prefix}.x", text.encode())
    await app.start()
    try:
        subscriber = app.subscribers[0]
        assert await until(lambda: subscriber.in_flight.messages == HELD and len(calls) == 2)
        stopping = asyncio.create_task(app.stop(timeout_s=0.8))
        await asyncio.sleep(0.05)
        release.set()  # the first handler finishes while the app stops
        await asyncio.wait_for(stopping, 10)
    finally:
        await app.stop(timeout_s=0.5)  # when an assertion came first
    assert len(calls) == 2, "no queued message was started once stopping"
    assert finished == calls[:1] and cancelled == calls[1:]
    got = await second_app(any_transport, stream, HELD - 1, concurrency=2)
    assert sorted(text for text, _ in got) == sorted(every - set(finished)), (
        "every unfinished message comes again, once; the finished one does not"
    )
    assert dict(got)[calls[1]] >= 2, "the cancelled one was nacked after its first delivery"


# -- a real process, stopped by a signal ------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_a_worker_gracefully_without_losing_a_message(
    tmp_path: Path, signum: signal.Signals
) -> None:
    data, log = tmp_path / "broker", tmp_path / "processed.log"
    every = [f"m{i:02}" for i in range(40)]
    transport = await connect(f"file://{data}", EmbeddedOptions(durability="always"))
    try:
        await transport.create_stream(StreamSpec(worker.STREAM, (f"{worker.STREAM}.>",)))
        for text in every:
            await transport.publish(f"{worker.STREAM}.x", text.encode())
    finally:
        await transport.close()

    stuck = every[3]  # a handler that outlives the shutdown deadline
    timeout_s = 1.0
    with (tmp_path / "worker.err").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            worker.__file__,
            str(data),
            str(log),
            "--stuck",
            stuck,
            "--shutdown-timeout",
            str(timeout_s),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
        try:
            assert await until(lambda: len(_recorded(log)) >= 8, timeout=30), proc.returncode
            proc.send_signal(signum)
            begun = time.monotonic()
            rc = await asyncio.wait_for(proc.wait(), 15)
            elapsed = time.monotonic() - begun
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert rc == 0, (tmp_path / "worker.err").read_text()
    assert elapsed < timeout_s + 3, f"the worker took {elapsed:.1f}s to stop (deadline {timeout_s}s)"
    recorded = _recorded(log)
    assert stuck not in recorded and set(recorded) < set(every), "the signal came mid-way"
    assert len(recorded) == len(set(recorded)), "no message was processed twice by one worker"

    transport = await connect(f"file://{data}", EmbeddedOptions(durability="always"))
    try:
        lag = await transport.lag(worker.STREAM, worker.GROUP)
        unfinished = sum(p.pending + p.in_flight + p.waiting for p in lag)
        remaining: list[str] = []
        app = App(transport)

        async def drain(text: str) -> None:
            remaining.append(text)

        worker.subscribe(app, drain)
        async with app:
            assert await until(lambda: len(remaining) >= unfinished, timeout=10)
            await asyncio.sleep(0.3)
    finally:
        await transport.close()
    assert stuck in remaining, "the cancelled message was nacked"
    assert set(remaining) | set(recorded) == set(every), "no message was lost"
    assert set(every) - set(remaining) <= set(recorded), "every acknowledged message was processed"
    assert len(remaining) == unfinished == len(set(remaining))


def _recorded(log: Path) -> list[str]:
    if not log.exists():
        return []
    # A line without its newline was cut short; the worker writes whole lines, so none is.
    return [line for line in log.read_text().split("\n") if line]
