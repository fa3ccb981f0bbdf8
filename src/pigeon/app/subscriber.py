"""One handler at work: fetch within the flow limits, call the handler, settle by outcome.

Settling rules (the default ack policy is ``auto``):

- the handler returned: its value is published to ``publish_to`` and sent as the reply to
  a request, then the message is acknowledged, never before;
- `Reject`, a payload that does not decode, a non-retryable error, or the last attempt
  failing: the message goes to the group's dead letters with the reason;
- `Nack`, `Retry` or a retryable error: tried again under the `RetryPolicy`'s strategy.

With ``ack="manual"`` the handler settles through its `Context`; a message it returns
without settling is nacked (and a warning logged) rather than left to its lease.

In an ordered group a nack rewinds the partition to the nacked message, so the messages
behind it that were already fetched are dropped here: the group delivers them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import HandlerTimeoutError, InvalidHandlerError, PayloadDecodeError, PigeonError
from ..message import Headers, Message
from ..subjects import matches
from ..transport.base import Consumer, ConsumerSpec, GroupKind, Received, StartAt, Subscription
from . import retrystream
from .context import Context
from .control import Nack, PoisonMessage, Reject, Retry
from .flow import Batch, Flow, InFlight
from .handler import Handler
from .middleware.base import CallNext, Middleware, compose
from .middleware.timeout import Timeout
from .redrive import RedrivePolicy
from .retry import RetryPolicy, Strategy

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pigeon.app")

AckPolicy = Literal["auto", "manual"]
FETCH_TIMEOUT_S = 1.0  # how long a stopping subscriber may wait for its last fetch
_AGAIN = object()  # an in-process retry: call the handler again


@dataclass(frozen=True)
class SubscriberSpec:
    """Where a handler's messages come from and the policies applied to them.

    Durable (``stream`` and ``group`` given): a consumer group member; ``subject`` then
    filters the stream's messages (others are acknowledged unprocessed). Core (``subject``
    only, optionally a ``queue`` group): messages published while the app runs, at most
    once, never acknowledged; failures are retried in-process and then logged.
    """

    name: str
    subject: str | None = None
    stream: str | None = None
    group: str | None = None
    kind: GroupKind = "shared"
    queue: str | None = None
    start: StartAt = field(default_factory=StartAt.earliest)
    ack_wait_s: float = 30.0
    key_ordered: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None
    flow: Flow = field(default_factory=Flow)
    batch: Batch | None = None
    ack: AckPolicy = "auto"
    publish_to: str | None = None
    middleware: tuple[Middleware, ...] = ()
    redrive: RedrivePolicy | None = None

    @property
    def durable(self) -> bool:
        return self.group is not None


class Subscriber:
    def __init__(self, app: App, spec: SubscriberSpec, handler: Handler) -> None:
        self.app = app
        self.spec = spec
        self.handler = handler
        self.name = spec.name
        self.group = spec.group
        self.in_flight = InFlight(spec.flow)
        self.strategy: Strategy = "in_process"
        self._chain: CallNext = handler.call  # type: ignore[assignment]  # set in start
        self._consumers: list[Consumer] = []
        self._subscription: Subscription | None = None
        self._queue: asyncio.Queue[tuple[Received | None, Message, int]] = asyncio.Queue()
        self._lanes: dict[int, asyncio.Queue[tuple[Received | None, Message, int]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._fetchers: list[asyncio.Task[None]] = []
        self._rewinds: dict[int, int] = {}  # ordered: partition -> how often it was rewound
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        spec, transport = self.spec, self.app.transport
        timeout = [Timeout(spec.timeout_s)] if spec.timeout_s is not None else []
        inner = self._call_batch_of_one if spec.batch is not None else self._call
        self._chain = compose([*self.app.middleware, *spec.middleware, *timeout], inner)
        if not spec.durable:
            assert spec.subject is not None
            self._subscription = await transport.subscribe(spec.subject, queue=spec.queue)
            self._fetchers.append(asyncio.create_task(self._read_core(self._subscription)))
            self._start_lanes()
            return
        assert spec.stream is not None and spec.group is not None
        self.strategy = self._resolve_strategy()
        consumer = await transport.consumer(
            spec.stream,
            ConsumerSpec(
                spec.group,
                kind=spec.kind,
                start=spec.start,
                ack_wait_s=spec.ack_wait_s,
                # A backstop: a message that keeps crashing the process still ends.
                max_deliver=spec.retry.max_attempts,
                max_ack_pending=max(spec.flow.max_in_flight, 1),
                key_ordered=spec.key_ordered,
            ),
        )
        self._consumers.append(consumer)
        self._fetchers.append(asyncio.create_task(self._read(consumer, retries=False)))
        if self.strategy == "retry_stream":
            retries = retrystream.retry_stream(spec.stream, spec.group)
            await transport.create_stream(retries)
            retry_consumer = await transport.consumer(
                retries.name,
                ConsumerSpec(
                    spec.group,
                    ack_wait_s=max(spec.ack_wait_s, 5.0),
                    dead_letter=False,
                    max_ack_pending=max(spec.flow.max_in_flight, 1),
                ),
            )
            self._consumers.append(retry_consumer)
            self._fetchers.append(asyncio.create_task(self._read(retry_consumer, retries=True)))
        if spec.redrive is not None:
            self._fetchers.append(
                asyncio.create_task(spec.redrive.run(transport, spec.stream, spec.group, self._stopped))
            )
        self._start_lanes()

    async def _call(self, ctx: Context) -> Any:
        return await self.handler.call(self.app.codec, ctx)

    async def _call_batch_of_one(self, ctx: Context) -> Any:
        """A retried message of a batch handler comes back alone."""
        await self.handler.decode(self.app.codec, ctx)
        (outcome,) = self._outcomes(await self.handler.call_batch([ctx]), 1)
        if isinstance(outcome, Exception):
            raise outcome
        return None

    def _resolve_strategy(self) -> Strategy:
        wanted = self.spec.retry.strategy
        capabilities = self.app.transport.capabilities
        if wanted == "in_process" and self.spec.batch is not None:
            raise InvalidHandlerError(
                f"handler {self.name}: batch handlers retry through the broker or the retry stream, "
                "not in-process"
            )
        if wanted == "auto":
            return "broker" if capabilities.delayed_nack else "retry_stream"
        if wanted == "broker":
            self.app.transport.require("delayed_nack", "RetryPolicy(strategy='retry_stream')")
        return wanted

    def _start_lanes(self) -> None:
        # Ordered groups get one more lane per partition as partitions appear; these serve
        # shared groups, core subscriptions and retry-stream copies.
        for _ in range(self.spec.flow.concurrency):
            self._tasks.append(asyncio.create_task(self._lane(self._queue)))

    async def stop(self, deadline: float) -> None:
        """Stop fetching; let handlers finish until ``deadline`` (monotonic); nack the rest; leave."""
        self._stopping = True
        self._stopped.set()
        await self._wait(self._fetchers, deadline)
        for queue in (self._queue, *self._lanes.values()):
            for _ in range(max(1, self.spec.flow.concurrency)):
                queue.put_nowait((None, Message("$stop"), -1))
        await self._wait(self._tasks, deadline)
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.close()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    @staticmethod
    async def _wait(tasks: list[asyncio.Task[None]], deadline: float) -> None:
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- fetching -------------------------------------------------------------------------------

    async def _read(self, consumer: Consumer, *, retries: bool) -> None:
        while not self._stopping:
            room = self.in_flight.room()
            if not room:
                await self.in_flight.wait_for_room(FETCH_TIMEOUT_S)
                continue
            try:
                batch = await consumer.fetch(room, FETCH_TIMEOUT_S)
            except Exception as exc:
                if self._stopping:
                    return
                log.warning(
                    "subscriber %s: fetch failed (%s: %s); retrying", self.name, type(exc).__name__, exc
                )
                await asyncio.sleep(0.5)
                continue
            for received in batch:
                self._route(received, received.message, retries)

    async def _read_core(self, subscription: Subscription) -> None:
        while not self._stopping:
            if not self.in_flight.room():
                await self.in_flight.wait_for_room(FETCH_TIMEOUT_S)
                continue
            try:
                message = await subscription.next(FETCH_TIMEOUT_S)
            except TimeoutError:
                continue
            self._route(None, message, False)

    def _route(self, received: Received | None, message: Message, retries: bool) -> None:
        self.in_flight.take(len(message.payload))
        if received is not None and self.spec.kind == "ordered" and not retries:
            partition = received.partition
            lane = self._lanes.get(partition)
            if lane is None:
                lane = self._lanes[partition] = asyncio.Queue()
                self._tasks.append(asyncio.create_task(self._lane(lane)))
            lane.put_nowait((received, message, self._rewinds.get(partition, 0)))
            return
        self._queue.put_nowait((received, message, -2 if retries else -3))

    # -- processing -----------------------------------------------------------------------------

    async def _lane(self, queue: asyncio.Queue[tuple[Received | None, Message, int]]) -> None:
        while True:
            item = await queue.get()
            if item[2] == -1:
                return
            if self.spec.batch is not None and item[2] != -2:
                items = await self._collect(queue, item)
                try:
                    await self._process_batch(items)
                finally:
                    for _, message, _ in items:
                        self.in_flight.release(len(message.payload))
                continue
            received, message, tag = item
            try:
                if self._stopping and received is not None:
                    await self._settle_quietly(received, "nack")
                elif tag >= 0 and tag != self._rewinds.get(received.partition, 0):  # type: ignore[union-attr]
                    pass  # fetched before its partition was rewound: it will come again
                elif tag == -2:
                    await self._process_retry(received, message)  # type: ignore[arg-type]
                else:
                    await self._process(received, message, received.delivery_count if received else 1)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("subscriber %s: unexpected error settling %r", self.name, message)
            finally:
                self.in_flight.release(len(message.payload))

    async def _collect(
        self,
        queue: asyncio.Queue[tuple[Received | None, Message, int]],
        first: tuple[Received | None, Message, int],
    ) -> list[tuple[Received | None, Message, int]]:
        assert self.spec.batch is not None
        items = [first]
        deadline = time.monotonic() + self.spec.batch.max_wait_s
        while len(items) < self.spec.batch.max_messages:
            try:
                item = (
                    queue.get_nowait()
                    if queue.qsize()
                    else await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                )
            except TimeoutError:
                break
            if item[2] in (-1, -2):
                queue.put_nowait(item)  # a stop signal or a retry: not part of this batch
                break
            items.append(item)
        return items

    def _skip(self, message: Message) -> bool:
        """Messages this handler acknowledges without processing."""
        redrive_for = message.headers.get(Headers.REDRIVE_FOR)
        if redrive_for is not None and redrive_for != self.group:
            return True  # a redrive meant for another group
        return bool(
            self.spec.durable and self.spec.subject and not matches(self.spec.subject, message.subject)
        )

    async def _process(self, received: Received | None, message: Message, attempt: int) -> None:
        if received is not None and self._skip(message):
            await received.ack()
            return
        while True:
            ctx = Context(self.app, self, message, received, attempt)
            try:
                result = await self._chain(ctx)
                await self._deliver_result(ctx, result)
            except asyncio.CancelledError:
                if received is not None and not ctx.settled:
                    await self._settle_quietly(received, "nack")  # shutdown: it was not processed
                raise
            except Exception as error:
                if await self._failed(ctx, error) is not _AGAIN:
                    return
                attempt += 1
                continue
            await self._succeeded(ctx)
            return

    async def _deliver_result(self, ctx: Context, result: Any) -> None:
        if result is None or ctx.state.get("duplicate"):
            return
        if self.spec.publish_to is not None:
            await ctx.publish(self.spec.publish_to, result)
        if ctx.message.headers.get(Headers.REPLY_TO):
            reply_to = ctx.message.headers[Headers.REPLY_TO]
            payload, headers = await self.app.codec.encode(result, reply_to)
            await self.app.transport.reply(ctx.message, payload, headers=ctx.outgoing_headers(headers))

    async def _succeeded(self, ctx: Context) -> None:
        if ctx.received is None or ctx.settled:
            return
        if self.spec.ack == "manual" and not ctx.state.get("duplicate"):
            log.warning(
                "handler %s returned without settling %r (ack='manual'): nacking it", self.name, ctx.message
            )
            await ctx.nack()
            return
        await ctx.ack()

    async def _failed(self, ctx: Context, error: Exception) -> object:
        """Settle a failed attempt; `_AGAIN` asks for an in-process retry."""
        policy, received = self.spec.retry, ctx.received
        if ctx.settled:
            log.warning("handler %s raised after settling %r: %r", self.name, ctx.message, error)
            return None
        if isinstance(error, PayloadDecodeError):
            error = PoisonMessage(str(error))
        if self.gives_up(ctx, error):
            if received is None:
                log.error(
                    "handler %s gave up on %r after %d attempts: %r",
                    self.name,
                    ctx.message,
                    ctx.attempt,
                    error,
                )
            else:
                await self._give_up(ctx, error)
            return None
        override = error.delay if isinstance(error, Nack | Retry) else None
        delay = policy.delay(ctx.attempt) if override is None else override
        strategy = self.strategy if received is not None else "in_process"
        if strategy == "in_process":
            await self._sleep_holding(received, delay)
            return _AGAIN
        assert received is not None
        if strategy == "broker":
            ctx.settled = True
            if self.spec.kind == "ordered":
                self._rewinds[received.partition] = self._rewinds.get(received.partition, 0) + 1
            await received.nack(delay, error=error)
            return None
        await self._to_retry_stream(ctx, delay, error)
        return None

    def gives_up(self, ctx: Context, error: Exception) -> bool:
        """Whether this failed attempt is the message's last (dead-lettered, or dropped without
        a broker) rather than retried; the `Metrics` middleware asks it too."""
        policy = self.spec.retry
        retryable = isinstance(error, Nack | Retry) or (
            not isinstance(error, Reject | PayloadDecodeError) and policy.retryable(error)
        )
        return not retryable or ctx.attempt >= policy.max_attempts

    async def _give_up(self, ctx: Context, error: BaseException) -> None:
        assert ctx.received is not None and self.spec.stream is not None and self.group is not None
        ctx.settled = True
        if ctx.received.message is not ctx.message:
            # A retry-stream copy: its own group keeps no dead letters; write to the original's.
            await retrystream.dead_letter(
                self.app.transport, self.spec.stream, self.group, ctx.message, ctx.attempt, error
            )
            await ctx.received.ack()
            return
        await ctx.received.term(error)

    async def _to_retry_stream(self, ctx: Context, delay: float, error: BaseException) -> None:
        assert ctx.received is not None and self.spec.stream is not None and self.group is not None
        headers, copy_id = retrystream.retry_copy(ctx.message, ctx.attempt + 1, delay, error)
        spec = retrystream.retry_stream(self.spec.stream, self.group)
        await self.app.transport.publish(
            spec.subjects[0],
            ctx.message.payload,
            key=ctx.message.key,
            headers=headers,
            msg_id=retrystream.dedup_id(self.app.transport, copy_id),
        )
        ctx.settled = True
        await ctx.received.ack()

    async def _process_retry(self, received: Received, copy: Message) -> None:
        """A copy from the retry stream: wait until it is due, then handle it like the original."""
        await self._sleep_holding(received, retrystream.due_at(copy) - time.time())
        if self._stopping:
            await self._settle_quietly(received, "nack")
            return
        await self._process(received, retrystream.rebuild(copy), retrystream.attempt_of(copy))

    async def _sleep_holding(self, received: Received | None, seconds: float) -> None:
        """Wait, extending the message's lease meanwhile so that no one else gets it."""
        end = time.monotonic() + max(0.0, seconds)
        beat = max(0.05, self.spec.ack_wait_s / 3)
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, beat))
            if received is not None and time.monotonic() < end:
                with contextlib.suppress(PigeonError):
                    await received.in_progress()

    async def _settle_quietly(self, received: Received, how: Literal["nack", "ack"]) -> None:
        try:
            await (received.nack() if how == "nack" else received.ack())
        except Exception as exc:  # the lease may be gone already: it is redelivered anyway
            log.debug("subscriber %s: could not %s %r: %r", self.name, how, received, exc)

    # -- batches ------------------------------------------------------------------------------

    async def _process_batch(self, items: Sequence[tuple[Received | None, Message, int]]) -> None:
        contexts: list[Context] = []
        for received, message, tag in items:
            if received is None:
                continue
            if self._stopping:
                await self._settle_quietly(received, "nack")
                continue
            if tag >= 0 and tag != self._rewinds.get(received.partition, 0):
                continue
            if self._skip(message):
                await received.ack()
                continue
            ctx = Context(self.app, self, message, received, received.delivery_count)
            try:
                await self.handler.decode(self.app.codec, ctx)
            except PayloadDecodeError as exc:
                await self._failed(ctx, exc)
                continue
            contexts.append(ctx)
        if not contexts:
            return
        deadline = asyncio.timeout(self.spec.timeout_s)  # None: no deadline
        try:
            async with deadline:
                outcome = await self.handler.call_batch(contexts)
        except asyncio.CancelledError:
            for ctx in contexts:
                if ctx.received is not None and not ctx.settled:
                    await self._settle_quietly(ctx.received, "nack")
            raise
        except Exception as error:
            if isinstance(error, TimeoutError) and deadline.expired():
                # As the Timeout middleware reports a single handler's: one error type for both.
                error = HandlerTimeoutError(
                    f"batch handler {self.name!r} took longer than {self.spec.timeout_s}s "
                    f"on {len(contexts)} messages"
                )
            outcome = [error] * len(contexts)
        outcomes = self._outcomes(outcome, len(contexts))
        rewound: set[int] = set()
        for ctx, result in zip(contexts, outcomes, strict=True):
            assert ctx.received is not None
            if ctx.received.partition in rewound:
                continue  # behind a nack in an ordered group: delivered again
            if isinstance(result, Exception):
                before = self._rewinds.get(ctx.received.partition, 0)
                await self._failed(ctx, result)
                if self._rewinds.get(ctx.received.partition, 0) != before:
                    rewound.add(ctx.received.partition)
            else:
                await self._succeeded(ctx)

    def _outcomes(self, outcome: Any, count: int) -> list[Any]:
        if outcome is None:
            return [None] * count
        if isinstance(outcome, list) and len(outcome) == count:
            return outcome
        error = Reject(
            f"batch handler {self.name} returned {type(outcome).__name__}; return None or one "
            f"outcome (None or an exception) per message ({count})"
        )
        return [error] * count
