"""The Tracing middleware: handler spans continue the producer's trace and pass it on."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from app_helpers import fast_retry, until
from pigeon.app import App, Context
from pigeon.app.middleware.tracing import Tracing, inject_headers
from pigeon.errors import MissingExtraError
from pigeon.message import Headers, Message
from pigeon.testing.services import unique_name

IN_PROCESS = pytest.mark.parametrize("any_transport", ["memory", "embedded"], indirect=True)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def spans_named(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """The finished spans called ``name``, in the order they ended, once there are ``count``."""
    await until(lambda: sum(s.name == name for s in exporter.get_finished_spans()) >= count, timeout=10)
    spans = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(spans) == count, [s.name for s in exporter.get_finished_spans()]
    return spans


def traceparent_ids(headers: dict[str, str]) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent header."""
    _version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    return trace_id, span_id


@IN_PROCESS
async def test_the_trace_runs_from_the_producer_through_two_handlers(
    any_transport: Any, make_stream: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    stream, prefix = await make_stream()
    tracer = provider.get_tracer("test")
    app = App(any_transport, middleware=[Tracing(tracer_provider=provider)])
    first_seen: list[Message] = []
    second_seen: dict[str, Message] = {}

    @app.subscriber(f"{prefix}.in", stream=stream, group="first", publish_to=f"{prefix}.out.result")
    async def first(order: dict[str, Any], message: Message, ctx: Context) -> dict[str, Any]:
        first_seen.append(message)
        with tracer.start_as_current_span("enrich"):
            await ctx.publish(f"{prefix}.out.side", {"side": True})
        return {"billed": order["id"]}

    @app.subscriber(f"{prefix}.out.>", stream=stream, group="second")
    async def second(message: Message) -> None:
        second_seen[message.subject.rpartition(".")[2]] = message

    async with app:
        with tracer.start_as_current_span("checkout", kind=SpanKind.PRODUCER) as checkout:
            headers = {"x-tenant": "acme"}
            assert inject_headers(headers) is headers
            await app.publish(f"{prefix}.in", {"id": 7}, headers=headers)
        (handled,) = await spans_named(exporter, f"{prefix}.in process", 1)
        outputs = await spans_named(exporter, f"{prefix}.out.result process", 1)
        outputs += await spans_named(exporter, f"{prefix}.out.side process", 1)
        (enrich,) = await spans_named(exporter, "enrich", 1)

    producer = checkout.get_span_context()
    assert handled.kind is SpanKind.CONSUMER
    assert handled.context.trace_id == producer.trace_id
    assert handled.parent is not None and handled.parent.span_id == producer.span_id
    assert handled.parent.is_remote, "the parent came from the message's headers"
    trace_id = format_trace_id(handled.context.trace_id)

    # Published after the handler returned, the result's parent is the handler's span ...
    handler_span_id = format_span_id(handled.context.span_id)
    assert traceparent_ids(second_seen["result"].headers) == (trace_id, handler_span_id)
    # ... and what it published inside a span of its own descends from that span.
    assert enrich.parent is not None and enrich.parent.span_id == handled.context.span_id
    assert traceparent_ids(second_seen["side"].headers) == (trace_id, format_span_id(enrich.context.span_id))
    result_span, side_span = outputs
    assert result_span.parent is not None and result_span.parent.span_id == handled.context.span_id
    assert side_span.parent is not None and side_span.parent.span_id == enrich.context.span_id
    assert {result_span.context.trace_id, side_span.context.trace_id} == {producer.trace_id}

    (message,) = first_seen
    assert message.headers["x-tenant"] == "acme"
    assert dict(handled.attributes or {}) == {
        "messaging.system": "pigeon",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": f"{prefix}.in",
        "messaging.message.id": message.id,
        "messaging.consumer.group.name": "first",
        "messaging.destination.partition.id": "0",
        "pigeon.attempt": 1,
    }
    result_attributes = result_span.attributes or {}
    assert result_attributes["messaging.consumer.group.name"] == "second"
    assert result_attributes["messaging.message.id"] == second_seen["result"].id
    assert result_attributes["messaging.message.conversation_id"] == message.id
    assert second_seen["result"].headers[Headers.CORRELATION_ID] == message.id


@IN_PROCESS
async def test_a_failing_handler_span_has_status_error_and_the_exception(
    any_transport: Any, make_stream: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport, middleware=[Tracing(tracer_provider=provider)])

    @app.subscriber(stream=stream, group="g", retry=fast_retry(2))
    async def fail(_: bytes) -> None:
        raise ValueError("no such customer")

    async with app:
        await app.publish(f"{prefix}.x", b"1")
        spans = await spans_named(exporter, f"{prefix}.x process", 2)

    assert [(s.attributes or {})["pigeon.attempt"] for s in spans] == [1, 2]
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ValueError: no such customer"
        assert (span.attributes or {})["error.type"] == "ValueError"
        (event,) = span.events
        assert event.name == "exception"
        assert (event.attributes or {})["exception.type"] == "ValueError"
        assert (event.attributes or {})["exception.message"] == "no such customer"


async def test_without_a_traceparent_the_handler_span_starts_a_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from pigeon.transport import connect

    transport = await connect("memory://")
    subject = unique_name("core").replace("-", "_")
    app = App(transport, middleware=[Tracing(tracer_provider=provider)])
    outputs: list[Message] = []

    @app.subscriber(f"{subject}.in", publish_to=f"{subject}.out")
    async def handle(_: bytes) -> bytes:
        return b"done"

    @app.subscriber(f"{subject}.out")
    async def collect(message: Message) -> None:
        outputs.append(message)

    try:
        async with app:
            await app.publish(f"{subject}.in", b"x")
            (span,) = await spans_named(exporter, f"{subject}.in process", 1)
            assert await until(lambda: len(outputs) == 1, timeout=10)
    finally:
        await transport.close()
    assert span.parent is None
    attributes = span.attributes or {}
    assert "messaging.consumer.group.name" not in attributes, "a core subscription has no group"
    assert "messaging.destination.partition.id" not in attributes
    assert traceparent_ids(outputs[0].headers)[0] == format_trace_id(span.context.trace_id)


async def test_a_given_propagator_replaces_the_global_one(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from pigeon.transport import connect

    transport = await connect("memory://")
    subject = unique_name("core").replace("-", "_")
    # Only baggage: the traceparent the global propagator would read is ignored.
    app = App(transport, middleware=[Tracing(provider, propagator=W3CBaggagePropagator())])

    @app.subscriber(subject)
    async def handle(_: bytes) -> None:
        pass

    try:
        async with app:
            with provider.get_tracer("test").start_as_current_span("producer"):
                await app.publish(subject, b"x", headers=inject_headers({}))
            (span,) = await spans_named(exporter, f"{subject} process", 1)
    finally:
        await transport.close()
    assert span.parent is None


def test_without_opentelemetry_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # what an absent package looks like
    monkeypatch.delitem(sys.modules, "pigeon.app.middleware.tracing")
    with pytest.raises(MissingExtraError, match=r"pip install 'pigeon\[otel\]'"):
        importlib.import_module("pigeon.app.middleware.tracing")
