"""Prometheus metrics of handler calls and publishes: outcomes, durations, retries, redeliveries.

``App(transport, middleware=[Metrics()])`` counts every handler call under the message's
subject and the handler's group, by what became of the message:

- ``acked``: the handler returned;
- ``nacked``: it raised `Nack` and will be delivered again;
- ``retried``: it failed and the retry policy tries it again;
- ``dead_lettered``: rejected, not retryable, or out of attempts (a core subscription, which
  has no dead letters, counts ``dropped`` instead).

The retry decision is the subscriber's own (`Subscriber.gives_up`), so the counts follow the
runtime. A call with ``ctx.attempt > 1`` is a retry; a message the broker delivered more than
once is a redelivery. As App middleware it also counts `App.publish` (and so ``ctx.publish``)
per subject. Serve the registry with ``prometheus_client.start_http_server`` or
``make_asgi_app``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from ..context import Context
from ..control import Nack
from .base import CallNext

__all__ = ["Metrics"]

_LABELS = ["subject", "group"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.consumed = Counter(
            "pigeon_messages_consumed",
            "Handler calls by what became of the message",
            [*_LABELS, "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "pigeon_handler_duration_seconds", "Time spent in the handler", _LABELS, registry=registry
        )
        self.retries = Counter(
            "pigeon_retries", "Calls that were retries of a failed attempt", _LABELS, registry=registry
        )
        self.redeliveries = Counter(
            "pigeon_redeliveries", "Messages the broker delivered more than once", _LABELS, registry=registry
        )
        self.published = Counter(
            "pigeon_published", "Messages published by the App", ["subject"], registry=registry
        )

    def on_publish(self, subject: str) -> None:
        self.published.labels(subject).inc()

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        labels = (ctx.message.subject, ctx.subscriber.group or "")
        if ctx.attempt > 1:
            self.retries.labels(*labels).inc()
        received = ctx.received
        if received is not None and received.delivery_count > 1:
            self.redeliveries.labels(*labels).inc()
        started = time.perf_counter()
        try:
            result = await call_next(ctx)
        except Exception as error:
            self._count(labels, _failure(ctx, error), started)
            raise
        self._count(labels, "acked", started)
        return result

    def _count(self, labels: tuple[str, str], outcome: str, started: float) -> None:
        self.duration.labels(*labels).observe(time.perf_counter() - started)
        self.consumed.labels(*labels, outcome).inc()


def _failure(ctx: Context, error: Exception) -> str:
    if ctx.subscriber.gives_up(ctx, error):
        return "dropped" if ctx.received is None else "dead_lettered"
    return "nacked" if isinstance(error, Nack) else "retried"
