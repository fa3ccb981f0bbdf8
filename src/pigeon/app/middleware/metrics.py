"""Prometheus metrics of handler calls: outcomes, durations, retries and redeliveries.

``App(transport, middleware=[Metrics()])`` (or per handler) counts every call under the
handler's subject and group. The outcome is what the handler told pigeon: ``ok`` (returned),
``nack``, ``reject`` (dead-lettered at once) or ``error`` (the retry policy decides). A call
with ``ctx.attempt > 1`` is a retry; a message delivered more than once by the broker is a
redelivery. Serve them with ``prometheus_client.start_http_server`` or any ASGI mount.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from ..context import Context
from ..control import Nack, Reject
from .base import CallNext

__all__ = ["Metrics"]

_LABELS = ["subject", "group"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.consumed = Counter(
            "pigeon_messages_consumed",
            "Handler calls by outcome",
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

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        labels = (ctx.message.subject, ctx.subscriber.group or "")
        if ctx.attempt > 1:
            self.retries.labels(*labels).inc()
        received = ctx.received
        if received is not None and received.delivery_count > 1:
            self.redeliveries.labels(*labels).inc()
        outcome = "error"
        started = time.perf_counter()
        try:
            result = await call_next(ctx)
            outcome = "ok"
            return result
        except Nack:
            outcome = "nack"
            raise
        except Reject:
            outcome = "reject"
            raise
        finally:
            self.duration.labels(*labels).observe(time.perf_counter() - started)
            self.consumed.labels(*labels, outcome).inc()
