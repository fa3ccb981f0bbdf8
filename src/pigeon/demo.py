"""The order pipeline that ``pigeon serve --demo`` and ``pigeon demo`` run.

It exists so that a newcomer's first look at the dashboard shows every pattern at work on
real streams: orders published with keys into a partitioned stream, a billing group that
sometimes fails and retries with backoff, a poison order and a rejected one that end in the
dead letters, an idempotent shipping group that skips a redelivered copy, a projection that
keeps revenue per customer in order, and lag that rises in bursts and drains between them.
Everything goes through the Transport contract, so it runs on any transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .app import App, Context, Flow, Reject, RetryPolicy
from .app.middleware.idempotency import Idempotent
from .engine.groups.config import Backoff
from .errors import MissingExtraError
from .message import Headers
from .patterns.idempotency.base import IdempotencyStore
from .transport.base import StreamSpec, Transport

__all__ = ["ORDERS_STREAM", "Order", "OrderPipeline"]

ORDERS_STREAM = "demo-orders"
ORDERS_SUBJECT = "demo.orders.created"
INVOICES_STREAM = "demo-invoices"
CUSTOMERS = [f"customer-{n}" for n in range(1, 9)]
# Orders per second in a burst and between bursts, and how long each lasts: the slow shipping
# group falls behind during a burst and catches up after it, so lag visibly moves.
BURST_RATE, CALM_RATE = 60.0, 4.0
BURST_S, CALM_S = 8.0, 16.0
POISON_EVERY = 50  # every 50th order goes out as a payload that does not decode
REJECT_EVERY = 70  # and every 70th with a negative amount, which billing refuses
REPLAY_EVERY = 40  # every 40th shipped order is delivered again, as a redriven copy would be


@dataclass
class Order:
    id: int
    customer: str
    amount: float


class OrderPipeline:
    """``await pipeline.start()``, then ``await pipeline.stop()``; ``counts`` says what happened."""

    def __init__(
        self, transport: Transport, folder: Path, *, speed: float = 1.0, seed: int | None = None
    ) -> None:
        self.transport = transport
        self.folder = folder
        self.speed = speed
        self.counts: Counter[str] = Counter()
        self.revenue: dict[str, float] = {}
        self._random = random.Random(seed)
        self._app = App(transport)
        self._publisher: asyncio.Task[None] | None = None
        self._store: IdempotencyStore | None = None

    async def start(self) -> None:
        await self.transport.create_stream(StreamSpec(ORDERS_STREAM, ("demo.orders.>",), partitions=3))
        await self.transport.create_stream(StreamSpec(INVOICES_STREAM, ("demo.invoices.>",)))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._store = store = await _idempotency_store(self.folder / "demo-shipping.sqlite")
        self._subscribe(Idempotent(store))
        await self._app.start()
        self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        await self._app.stop()
        if self._store is not None:
            await self._store.close()
            self._store = None

    def _subscribe(self, idempotent: Idempotent) -> None:
        app, retry = (
            self._app,
            RetryPolicy(max_attempts=4, backoff=Backoff(initial_s=0.5, multiplier=2, max_s=4)),
        )

        @app.subscriber(
            ORDERS_SUBJECT,
            stream=ORDERS_STREAM,
            group="billing",
            retry=retry,
            publish_to="demo.invoices.issued",
        )
        async def bill(order: Order, ctx: Context) -> dict[str, object]:
            if order.amount < 0:
                self.counts["rejected"] += 1
                raise Reject(f"order {order.id} has a negative amount")
            if self._random.random() < 0.15:
                self.counts["billing_failures"] += 1
                raise ConnectionError("payment gateway timed out")
            self.counts["billed"] += 1
            return {"order": order.id, "customer": order.customer, "total": order.amount}

        @app.subscriber(
            ORDERS_SUBJECT,
            stream=ORDERS_STREAM,
            group="shipping",
            middleware=[idempotent],
            flow=Flow(concurrency=1, max_in_flight=20, fetch_batch=20),
        )
        async def ship(order: Order, ctx: Context) -> None:
            await asyncio.sleep(0.04 / self.speed)  # a slow warehouse: 25 orders a second
            self.counts["shipped"] += 1
            if order.id % REPLAY_EVERY == 0 and Headers.ORIGINAL_MSG_ID not in ctx.message.headers:
                # The same order again, as a redrive would send it: the idempotent group skips it.
                await ctx.publish(
                    ORDERS_SUBJECT,
                    ctx.message.payload,
                    key=ctx.message.key,
                    headers={
                        Headers.ORIGINAL_MSG_ID: ctx.message.id,
                        Headers.CONTENT_TYPE: "application/json",
                    },
                )
                self.counts["replayed"] += 1

        @app.subscriber(ORDERS_SUBJECT, stream=ORDERS_STREAM, group="revenue-projection", kind="ordered")
        async def project(order: Order) -> None:
            if order.amount >= 0:
                self.revenue[order.customer] = round(self.revenue.get(order.customer, 0.0) + order.amount, 2)
                self.counts["projected"] += 1

    async def _publish_forever(self) -> None:
        numbers = itertools.count(1)
        while True:
            for rate, seconds in ((BURST_RATE * self.speed, BURST_S), (CALM_RATE * self.speed, CALM_S)):
                for _ in range(max(1, int(rate * seconds))):
                    await self._publish_one(next(numbers))
                    await asyncio.sleep(1 / rate)

    async def _publish_one(self, number: int) -> None:
        customer = self._random.choice(CUSTOMERS)
        if number % POISON_EVERY == 0:
            await self.transport.publish(ORDERS_SUBJECT, b"{not json", key=customer)
            self.counts["poison"] += 1
            return
        amount = -1.0 if number % REJECT_EVERY == 0 else round(self._random.uniform(5, 250), 2)
        await self._app.publish(ORDERS_SUBJECT, Order(number, customer, amount), key=customer)
        self.counts["published"] += 1


async def _idempotency_store(path: Path) -> IdempotencyStore:
    try:
        from .patterns.idempotency.sql import SqlIdempotencyStore
    except ImportError:
        raise MissingExtraError(
            "the demo keeps its idempotency marks in SQLite: install pigeon[sql]"
        ) from None
    store = SqlIdempotencyStore.from_url(f"sqlite+aiosqlite:///{path}")
    await store.create_table()
    return store
