"""Retry with backoff, by each strategy, on every transport: retries happen, wait, and end."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Context, Retry, RetryPolicy
from pigeon.engine.groups.config import Backoff
from pigeon.errors import InvalidConfigError
from pigeon.message import Headers

STRATEGIES = ["in_process", "broker", "retry_stream"]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_permanently_failing_message_stops_after_its_limit(
    any_transport: Any, make_stream: Any, strategy: str
) -> None:
    stream, prefix = await make_stream()
    make_stream.created += [f"{stream}-g-retry", f"{stream}-g-dlq"]
    app = App(any_transport)
    attempts: list[tuple[int, float]] = []
    ok: list[str] = []

    @app.subscriber(stream=stream, group="g", retry=fast_retry(3, strategy, delay=0.2), ack_wait_s=5)
    async def handle(text: str, ctx: Context) -> None:
        if text == "ok":
            ok.append(text)
            return
        attempts.append((ctx.attempt, time.monotonic()))
        raise ConnectionError(f"down, attempt {ctx.attempt}")

    async with app:
        await app.publish(f"{prefix}.x", "always fails", headers={"trace": "t1"})
        await app.publish(f"{prefix}.x", "ok")
        letters = await dead_letters(any_transport, stream, "g", 1, timeout=15)
        await asyncio.sleep(0.5)  # a fourth attempt would show up by now
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert all(gap >= 0.18 for gap in gaps), f"backoff not respected: {gaps}"
    assert ok == ["ok"], "the failing message does not block the others"
    (letter,) = letters
    assert letter.payload == b"always fails"
    assert letter.headers["trace"] == "t1"
    assert letter.headers[Headers.ERROR_TYPE] == "ConnectionError"
    assert letter.headers[Headers.ERROR_MESSAGE] == "down, attempt 3"
    assert letter.headers[Headers.ORIGINAL_SUBJECT] == f"{prefix}.x"
    if strategy == "retry_stream":
        state = await any_transport.stream_state(f"{stream}-g-retry")
        assert state.messages == 2, "one retry stream holds every delayed copy"


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_transient_failure_succeeds_on_a_later_attempt(
    any_transport: Any, make_stream: Any, strategy: str
) -> None:
    stream, prefix = await make_stream()
    make_stream.created += [f"{stream}-g-retry"]
    app = App(any_transport)
    seen: list[tuple[int, str]] = []

    @app.subscriber(stream=stream, group="g", retry=fast_retry(4, strategy), ack_wait_s=5)
    async def handle(text: str, ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.message.id))
        if ctx.attempt < 3:
            raise TimeoutError("slow dependency")

    async with app:
        ack = await app.publish(f"{prefix}.x", "eventually")
        assert await until(lambda: len(seen) == 3)
        await asyncio.sleep(0.3)
    assert [a for a, _ in seen] == [1, 2, 3]
    assert len({message_id for _, message_id in seen}) == 1, "every attempt sees the original id"
    assert ack is not None
    assert await any_transport.read_dead_letters(stream, "g") == []


async def test_non_retryable_errors_go_to_the_dead_letters_at_once(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    calls: list[str] = []
    policy = fast_retry(5, retry_on=(ConnectionError,), give_up_on=(ConnectionRefusedError,))

    @app.subscriber(stream=stream, group="g", retry=policy)
    async def handle(text: str) -> None:
        calls.append(text)
        if text == "value":
            raise ValueError("not in retry_on")
        if text == "refused":
            raise ConnectionRefusedError("in give_up_on")
        if text == "forced" and calls.count("forced") == 1:
            raise Retry("retry explicitly")

    async with app:
        for text in ("value", "refused", "forced"):
            await app.publish(f"{prefix}.x", text)
        letters = await dead_letters(any_transport, stream, "g", 2)
        assert await until(lambda: calls.count("forced") == 2)
    assert calls.count("value") == 1 and calls.count("refused") == 1
    assert sorted(letter.headers[Headers.ERROR_TYPE] for letter in letters) == [
        "ConnectionRefusedError",
        "ValueError",
    ]


async def test_the_default_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(backoff=Backoff(initial_s=1.0, multiplier=2.0, max_s=5.0, jitter=0.1))
    delays = [policy.delay(n) for n in range(1, 6)]
    for delay, base in zip(delays, [1, 2, 4, 5, 5], strict=True):
        assert base <= delay <= base * 1.1
    with pytest.raises(InvalidConfigError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(InvalidConfigError):
        RetryPolicy(strategy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        RetryPolicy(retry_on=(int,))  # type: ignore[arg-type]
