"""The App: handlers registered with decorators, run on any transport.

    app = App("file://./data")

    @app.subscriber("orders.>", stream="orders", group="billing", retry=RetryPolicy(max_attempts=3))
    async def bill(order: Order) -> Invoice: ...

    await app.run()   # until SIGTERM or SIGINT, then a graceful shutdown

Shutdown (`stop`): every subscriber stops fetching; handlers already running get until the
deadline (``shutdown_timeout_s``) to finish and are then cancelled; what was fetched but not
finished is nacked, so it is delivered again; the group memberships are closed, then the
transport (when the App opened it). Nothing is acknowledged that was not processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import InvalidConfigError, InvalidHandlerError
from ..subjects import validate_pattern, validate_subject
from ..transport import connect
from ..transport.base import GroupKind, PubAck, StartAt, Transport
from .codec import Codec, JsonCodec
from .flow import Batch, Flow
from .handler import Handler, HandlerFunc
from .middleware.base import Middleware
from .middleware.correlation import correlation
from .redrive import RedrivePolicy
from .retry import RetryPolicy
from .subscriber import AckPolicy, Subscriber, SubscriberSpec


class App:
    def __init__(
        self,
        transport: Transport | str,
        *,
        middleware: Sequence[Middleware] = (),
        codec: Codec | None = None,
        shutdown_timeout_s: float = 30.0,
    ) -> None:
        self._url = transport if isinstance(transport, str) else None
        self._transport = None if isinstance(transport, str) else transport
        # Correlation runs first, so every other middleware sees the ids it sets.
        self.middleware: tuple[Middleware, ...] = (correlation, *middleware)
        # Middleware that counts publishes too (`Metrics`) has an ``on_publish(subject)``.
        self._on_publish = [m.on_publish for m in middleware if hasattr(m, "on_publish")]
        self.codec: Codec = codec or JsonCodec()
        self.shutdown_timeout_s = shutdown_timeout_s
        self.subscribers: list[Subscriber] = []
        self._specs: list[tuple[SubscriberSpec, Handler]] = []
        self._running = False

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise InvalidConfigError("the App is not started: its transport is not open yet")
        return self._transport

    # -- registration ---------------------------------------------------------------------------

    def subscriber(
        self,
        subject: str | None = None,
        *,
        stream: str | None = None,
        group: str | None = None,
        kind: GroupKind = "shared",
        queue: str | None = None,
        start: StartAt | None = None,
        ack_wait_s: float = 30.0,
        key_ordered: bool = False,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        flow: Flow | None = None,
        batch: Batch | None = None,
        ack: AckPolicy = "auto",
        publish_to: str | None = None,
        middleware: Sequence[Middleware] = (),
        redrive: RedrivePolicy | None = None,
        name: str | None = None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated async function as a handler (see `SubscriberSpec`)."""
        if (stream is None) != (group is None):
            raise InvalidHandlerError("a durable subscriber needs both stream= and group=")
        if group is None and subject is None:
            raise InvalidHandlerError("a subscriber needs a subject, or a stream and a group")
        if group is not None and queue is not None:
            raise InvalidHandlerError("queue= is for core subscriptions; a group already shares its messages")
        if subject is not None:
            validate_pattern(subject)
        if publish_to is not None:
            validate_subject(publish_to)
        if ack not in ("auto", "manual"):
            raise InvalidHandlerError(f"ack must be 'auto' or 'manual', not {ack!r}")
        if redrive is not None and group is None:
            raise InvalidHandlerError("redrive= needs a durable subscriber (stream= and group=)")
        if ack == "manual" and batch is not None:
            raise InvalidHandlerError("batch handlers settle by their return value, not ack='manual'")
        if batch is not None and group is None:
            # Batches settle each message through its group; core messages have none (and were
            # skipped silently).
            raise InvalidHandlerError("a batch handler needs stream= and group=")
        if batch is not None and middleware:
            # A batch call does not go through the middleware chain: refuse rather than ignore it.
            raise InvalidHandlerError("middleware= does not wrap batch handlers; remove it or drop batch=")

        def register(func: HandlerFunc) -> HandlerFunc:
            handler = Handler.of(func, batch=batch is not None)
            spec = SubscriberSpec(
                name=name or handler.name,
                subject=subject,
                stream=stream,
                group=group,
                kind=kind,
                queue=queue,
                start=start or StartAt.earliest(),
                ack_wait_s=ack_wait_s,
                key_ordered=key_ordered,
                retry=retry or RetryPolicy(),
                timeout_s=timeout,
                flow=flow or Flow(),
                batch=batch,
                ack=ack,
                publish_to=publish_to,
                middleware=tuple(middleware),
                redrive=redrive,
            )
            if timeout is not None:
                from .middleware.timeout import Timeout

                Timeout(timeout)  # validate now, at registration
            self._specs.append((spec, handler))
            return func

        return register

    # -- running --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        if self._transport is None:
            assert self._url is not None
            self._transport = await connect(self._url)
        self._running = True
        try:
            for spec, handler in self._specs:
                subscriber = Subscriber(self, spec, handler)
                await subscriber.start()
                self.subscribers.append(subscriber)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout_s: float | None = None) -> None:
        """Graceful shutdown within ``timeout_s`` (default ``shutdown_timeout_s``)."""
        if not self._running:
            return
        self._running = False
        deadline = time.monotonic() + (self.shutdown_timeout_s if timeout_s is None else timeout_s)
        await asyncio.gather(*(s.stop(deadline) for s in self.subscribers))
        self.subscribers.clear()
        if self._url is not None and self._transport is not None:
            await self._transport.close()
            self._transport = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Start, run until SIGTERM or SIGINT (or ``stop`` is set), then shut down gracefully."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        value: Any = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Encode ``value`` with the App's codec and publish it."""
        payload, codec_headers = await self.codec.encode(value, subject)
        if headers:
            codec_headers.update(headers)
        ack = await self.transport.publish(
            subject, payload, key=key, headers=codec_headers or None, msg_id=msg_id
        )
        for observe in self._on_publish:
            observe(subject)
        return ack

    async def request(
        self, subject: str, value: Any = b"", *, response: Any = bytes, timeout: float = 1.0
    ) -> Any:
        """Send a request and decode the reply as ``response``."""
        payload, headers = await self.codec.encode(value, subject)
        reply = await self.transport.request(subject, payload, headers=headers or None, timeout=timeout)
        return await self.codec.decode(reply.payload, response, reply.subject)
