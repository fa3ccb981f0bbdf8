"""OpenTelemetry tracing: one CONSUMER span per handler call, continuing the producer's trace.

    from pigeon.app.middleware.tracing import Tracing, inject_headers

    app = App(transport, middleware=[Tracing()])  # the global tracer provider and propagator

The span (named ``"{subject} process"``) is a child of the W3C trace context
(``traceparent``/``tracestate``) found in the consumed message's headers, or a new trace
without one. It carries the messaging semantic-convention attributes and ``pigeon.attempt``;
a failing call records the exception and sets the status to ERROR (a deliberate `Nack` or
`Retry` counts as a failure too). Each attempt of a retried message gets its own span.

Every message the handler publishes through ``ctx.publish``, and its ``publish_to`` result,
carries the trace on: its parent is the span current at publish time (the handler's span, or
one the handler started inside it); the ``publish_to`` result's parent is the handler's span.

A producer outside any handler starts the trace itself::

    with tracer.start_as_current_span("checkout"):
        await app.publish("orders.created", order, headers=inject_headers({}))

Needs the ``otel`` extra (``opentelemetry-api``); spans are only recorded once an SDK
tracer provider is configured, but the trace context is passed on either way.
"""

from __future__ import annotations

from typing import Any

from ... import __version__
from ...errors import MissingExtraError
from ...message import Headers
from ..context import Context
from .base import CallNext

try:
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
    from opentelemetry.util.types import AttributeValue
except ModuleNotFoundError as exc:
    raise MissingExtraError(
        "the Tracing middleware needs opentelemetry-api: pip install 'pigeon[otel]'"
    ) from exc

__all__ = ["Tracing", "inject_headers"]


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to ``headers`` (with the global propagator) and return them."""
    propagate.inject(headers)
    return headers


class Tracing:
    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, propagator: TextMapPropagator | None = None
    ) -> None:
        # Without a provider the tracer follows the global one, even when it is set later.
        self._tracer = trace.get_tracer("pigeon", __version__, tracer_provider)
        self._propagator = propagator

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        # Looked up per call, so that a global propagator configured after the App is honoured.
        propagator = self._propagator or propagate.get_global_textmap()
        parent = propagator.extract(ctx.message.headers)
        running = True
        with self._tracer.start_as_current_span(
            f"{ctx.message.subject} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=_attributes(ctx),
            # Done below for `Exception` only: older API versions also flagged a cancellation.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            def inject(headers: dict[str, str]) -> None:
                # The publish_to result is published after the handler returned, when its span
                # is no longer current.
                context = None if running else trace.set_span_in_context(span)
                propagator.inject(headers, context=context)

            ctx.publish_hooks.append(inject)
            try:
                return await call_next(ctx)
            except Exception as exc:
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                running = False


def _attributes(ctx: Context) -> dict[str, AttributeValue]:
    message = ctx.message
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "pigeon",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": message.subject,
        "messaging.message.id": message.id,
        "pigeon.attempt": ctx.attempt,
    }
    if ctx.subscriber.group is not None:
        attributes["messaging.consumer.group.name"] = ctx.subscriber.group
    if message.partition is not None:
        attributes["messaging.destination.partition.id"] = str(message.partition)
    correlation = message.headers.get(Headers.CORRELATION_ID)
    if correlation:
        attributes["messaging.message.conversation_id"] = correlation
    return attributes
