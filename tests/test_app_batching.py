"""Batch handlers on every transport: how messages are grouped, and how each one is settled."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Batch, Context, Reject
from pigeon.app.middleware import RateLimit
from pigeon.errors import InvalidConfigError, InvalidHandlerError
from pigeon.message import Headers
from pigeon.transport import StreamSpec, connect
from pigeon.transport.base import Transport


@dataclasses.dataclass
class Order:
    id: int


@pytest.fixture(params=["memory", "embedded"])
async def in_process(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Transport]:
    """For what the App decides by itself, whatever the broker: the in-process transports."""
    url = "memory://" if request.param == "memory" else f"file://{tmp_path / 'broker'}"
    transport = await connect(url)
    try:
        yield transport
    finally:
        await transport.close()  # the memory broker and tmp_path go with their streams


async def new_stream(transport: Transport) -> tuple[str, str]:
    await transport.create_stream(StreamSpec("orders", ("orders.>",)))
    return "orders", "orders"


async def publish_orders(app: App, prefix: str, ids: range) -> None:
    for i in ids:
        await app.transport.publish(f"{prefix}.order", b'{"id": %d}' % i)


async def test_calls_hold_at_most_max_messages_and_each_message_once(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    calls: list[list[int]] = []

    @app.subscriber(stream=stream, group="g", batch=Batch(max_messages=10, max_wait_s=0.05))
    async def handle(orders: list[Order]) -> None:
        calls.append([order.id for order in orders])

    await publish_orders(app, prefix, range(25))
    async with app:
        assert await until(lambda: sum(map(len, calls)) >= 25), calls
        await asyncio.sleep(0.3)  # a repeat would show up by now
    assert all(1 <= len(call) <= 10 for call in calls), calls
    assert len(calls) >= 3
    assert sorted(i for call in calls for i in call) == list(range(25)), "each message in one call, once"


async def test_a_batch_waits_max_wait_s_for_more_then_flushes_what_it_has(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    calls: list[tuple[float, list[int]]] = []

    @app.subscriber(stream=stream, group="g", batch=Batch(max_messages=10, max_wait_s=0.4))
    async def handle(orders: list[Order]) -> None:
        calls.append((time.monotonic(), [order.id for order in orders]))

    async with app:
        begun = time.monotonic()
        await publish_orders(app, prefix, range(1))
        await asyncio.sleep(0.05)
        await publish_orders(app, prefix, range(1, 3))
        assert await until(lambda: len(calls) >= 1)
        await asyncio.sleep(0.1)
    ((called_at, ids),) = calls
    assert ids == [0, 1, 2], "the later messages joined the waiting batch; one call for it"
    assert called_at - begun >= 0.4 * 0.98, "it waited max_wait_s before flushing three of ten"


async def test_only_the_items_that_failed_are_retried(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    seen: list[tuple[int, int]] = []

    @app.subscriber(stream=stream, group="g", batch=Batch(10, 0.05), retry=fast_retry(3), ack_wait_s=5)
    async def handle(orders: list[Order], contexts: list[Context]) -> list[Exception | None]:
        seen.extend((order.id, ctx.attempt) for order, ctx in zip(orders, contexts, strict=True))
        return [
            ValueError("flaky") if order.id == 2 and ctx.attempt == 1 else None
            for order, ctx in zip(orders, contexts, strict=True)
        ]

    await publish_orders(app, prefix, range(5))
    async with app:
        assert await until(lambda: (2, 2) in seen), seen
        await asyncio.sleep(0.3)  # a redelivery of the others would show up by now
    assert sorted(seen) == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1)]


async def test_a_rejected_item_and_a_poison_payload_alone_are_dead_lettered(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    make_stream.created.append(f"{stream}-g-dlq")
    app = App(any_transport)
    seen: list[int] = []

    @app.subscriber(stream=stream, group="g", batch=Batch(10, 0.05), retry=fast_retry(3), ack_wait_s=5)
    async def handle(orders: list[Order]) -> list[Exception | None]:
        seen.extend(order.id for order in orders)
        return [Reject("no such customer") if order.id == 3 else None for order in orders]

    await publish_orders(app, prefix, range(2))
    await any_transport.publish(f"{prefix}.order", b"not json")
    await publish_orders(app, prefix, range(2, 5))
    async with app:
        await dead_letters(any_transport, stream, "g", 2)
        assert await until(lambda: len(seen) >= 5)
        await asyncio.sleep(0.3)  # a retry or a third dead letter would show up by now
        letters = await any_transport.read_dead_letters(stream, "g")
    assert sorted(seen) == [0, 1, 2, 3, 4], "the others processed once, nothing retried"
    reasons = {letter.payload: letter.headers[Headers.ERROR_TYPE] for letter in letters}
    assert reasons == {b'{"id": 3}': "Reject", b"not json": "PoisonMessage"}
    (rejected,) = [letter for letter in letters if letter.payload == b'{"id": 3}']
    assert rejected.headers[Headers.ERROR_MESSAGE] == "no such customer"


async def test_an_exception_from_the_handler_fails_every_item(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    attempts: dict[int, list[int]] = {}

    @app.subscriber(stream=stream, group="g", batch=Batch(10, 0.05), retry=fast_retry(3), ack_wait_s=5)
    async def handle(orders: list[Order], contexts: list[Context]) -> None:
        for order, ctx in zip(orders, contexts, strict=True):
            attempts.setdefault(order.id, []).append(ctx.attempt)
        if any(ctx.attempt == 1 for ctx in contexts):
            raise ConnectionError("the warehouse is down")

    await publish_orders(app, prefix, range(5))
    async with app:
        assert await until(lambda: sum(map(len, attempts.values())) >= 10), attempts
        await asyncio.sleep(0.3)
    assert attempts == {i: [1, 2] for i in range(5)}, "every item failed once, then succeeded"


async def test_a_batch_past_its_timeout_fails_every_item_as_a_timeout(in_process: Transport) -> None:
    stream, prefix = await new_stream(in_process)
    app = App(in_process)
    cancelled: list[list[int]] = []

    @app.subscriber(
        stream=stream, group="g", batch=Batch(10, 0.05), timeout=0.2, retry=fast_retry(1), ack_wait_s=5
    )
    async def handle(orders: list[Order]) -> None:
        try:
            await asyncio.sleep(5)
        finally:
            cancelled.append([order.id for order in orders])

    await publish_orders(app, prefix, range(3))
    async with app:
        letters = await dead_letters(in_process, stream, "g", 3)
    assert sorted(i for call in cancelled for i in call) == [0, 1, 2]
    assert sorted(letter.payload for letter in letters) == [b'{"id": %d}' % i for i in range(3)]
    assert {letter.headers[Headers.ERROR_TYPE] for letter in letters} == {"HandlerTimeoutError"}


async def test_a_wrong_number_of_outcomes_rejects_the_batch(in_process: Transport) -> None:
    stream, prefix = await new_stream(in_process)
    app = App(in_process)

    @app.subscriber(stream=stream, group="g", batch=Batch(10, 0.05), retry=fast_retry(3), ack_wait_s=5)
    async def handle(orders: list[Order]) -> list[None]:
        return [None]  # one outcome, whatever the size of the batch

    await publish_orders(app, prefix, range(3))
    async with app:
        letters = await dead_letters(in_process, stream, "g", 3)
    assert len(letters) == 3
    assert all("one outcome" in letter.headers[Headers.ERROR_MESSAGE] for letter in letters)


async def test_an_ordered_group_keeps_each_partitions_order_through_a_retry(
    any_transport: Any, make_stream: Any
) -> None:
    """A failed item rewinds its partition: the items after it in the batch are not settled
    and come again, after it. Concatenating, per call, the items before the first failure
    gives each key's messages exactly once and in order."""
    stream, prefix = await make_stream(partitions=2)
    app = App(any_transport)
    settled: list[int] = []
    failed_once: set[int] = set()

    @app.subscriber(
        stream=stream,
        group="g",
        kind="ordered",
        batch=Batch(10, 0.05),
        retry=fast_retry(3),
        ack_wait_s=5,
    )
    async def handle(orders: list[Order]) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for order in orders:
            if order.id in (7, 18) and order.id not in failed_once:
                failed_once.add(order.id)
                outcomes.append(ValueError("not yet"))
            else:
                outcomes.append(None)
        first_failure = next((i for i, o in enumerate(outcomes) if o is not None), len(orders))
        settled.extend(order.id for order in orders[:first_failure])
        return outcomes

    for i in range(25):
        await app.transport.publish(f"{prefix}.order", b'{"id": %d}' % i, key=f"k{i % 4}")
    async with app:
        assert await until(lambda: len(settled) >= 25), settled
        await asyncio.sleep(0.3)
    assert failed_once == {7, 18}
    assert Counter(settled) == Counter(range(25)), "each settled once"
    for key in range(4):
        mine = [i for i in settled if i % 4 == key]
        assert mine == sorted(mine), f"key k{key} out of order: {mine}"


# -- registration ------------------------------------------------------------------------------


def test_a_batch_handler_must_take_a_list() -> None:
    app = App("memory://")

    async def one(order: Order) -> None: ...

    with pytest.raises(InvalidHandlerError, match=r"list\[T\]"):
        app.subscriber(stream="s", group="g", batch=Batch())(one)


def test_a_batch_handler_needs_a_stream_and_a_group() -> None:
    """Core subscriptions are not acknowledged: a batch could not be settled item by item."""
    app = App("memory://")

    async def handle(orders: list[Order]) -> None: ...

    with pytest.raises(InvalidHandlerError, match="stream= and group="):
        app.subscriber("orders.>", batch=Batch())(handle)


def test_middleware_on_a_batch_handler_is_refused_not_ignored() -> None:
    app = App("memory://")

    async def handle(orders: list[Order]) -> None: ...

    with pytest.raises(InvalidHandlerError, match="middleware"):
        app.subscriber(stream="s", group="g", batch=Batch(), middleware=[RateLimit(10)])(handle)


@pytest.mark.parametrize(
    "kwargs", [{"max_messages": 0}, {"max_messages": 2.5}, {"max_wait_s": 0}, {"max_wait_s": float("nan")}]
)
def test_batch_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError, match=next(iter(kwargs))):
        Batch(**kwargs)
