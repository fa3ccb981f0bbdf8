"""Handlers: typed payloads, settling by return and by exception, outputs, replies, middleware."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pydantic
import pytest

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Context, Nack, Reject
from pigeon.errors import InvalidHandlerError
from pigeon.message import Headers, Message
from pigeon.testing.services import unique_name


@dataclasses.dataclass
class Order:
    id: int
    amount: float


class Payment(pydantic.BaseModel):
    order: int
    currency: str


async def test_each_payload_type_decodes_from_the_annotation(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    got: dict[str, Any] = {}

    def handler_for(kind: str, annotation: Any) -> None:
        async def handle(payload):  # type: ignore[no-untyped-def]
            got[kind] = payload

        handle.__annotations__ = {"payload": annotation, "return": None}
        app.subscriber(f"{prefix}.{kind}", stream=stream, group=f"g-{kind}")(handle)

    for kind, annotation in [
        ("bytes", bytes),
        ("str", str),
        ("dict", dict),
        ("dc", Order),
        ("model", Payment),
    ]:
        handler_for(kind, annotation)
    async with app:
        await app.publish(f"{prefix}.bytes", b"\x00raw")
        await app.publish(f"{prefix}.str", "héllo")
        await app.publish(f"{prefix}.dict", {"a": [1, 2]})
        await app.publish(f"{prefix}.dc", Order(7, 12.5))
        await app.publish(f"{prefix}.model", Payment(order=7, currency="EUR"))
        assert await until(lambda: len(got) == 5), got
    assert got == {
        "bytes": b"\x00raw",
        "str": "héllo",
        "dict": {"a": [1, 2]},
        "dc": Order(7, 12.5),
        "model": Payment(order=7, currency="EUR"),
    }


async def test_a_payload_that_does_not_decode_is_dead_lettered_at_once(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    calls = []

    @app.subscriber(stream=stream, group="billing", retry=fast_retry(5))
    async def bill(payment: Payment) -> None:
        calls.append(payment)

    async with app:
        await app.publish(f"{prefix}.p", b"{not json")
        await app.publish(f"{prefix}.p", {"order": "x", "currency": 3})
        await app.publish(f"{prefix}.p", Payment(order=1, currency="EUR"))
        letters = await dead_letters(any_transport, stream, "billing", 2)
        assert await until(lambda: len(calls) == 1)
    assert len(letters) == 2
    for letter in letters:
        assert letter.headers[Headers.ERROR_TYPE] == "PoisonMessage"
        assert "does not decode to Payment" in letter.headers[Headers.ERROR_MESSAGE]
        assert letter.headers[Headers.DELIVERY_COUNT] == "1", "poison is not retried"


async def test_ack_after_return_and_reject_and_nack_by_exception(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    seen: list[tuple[str, int, float]] = []

    @app.subscriber(stream=stream, group="g", retry=fast_retry(5), ack_wait_s=5)
    async def handle(text: str, ctx: Context) -> None:
        seen.append((text, ctx.attempt, time.monotonic()))
        if text == "reject":
            raise Reject("bad customer")
        if text == "nack" and ctx.attempt == 1:
            raise Nack(delay=0.3)

    async with app:
        for text in ("ok", "reject", "nack"):
            await app.publish(f"{prefix}.t", text)
        letters = await dead_letters(any_transport, stream, "g", 1)
        assert await until(lambda: sum(1 for s in seen if s[0] == "nack") == 2)
        await asyncio.sleep(0.3)  # nothing more may arrive
    assert [s[:2] for s in seen if s[0] != "nack"] == [("ok", 1), ("reject", 1)]
    first, second = [s for s in seen if s[0] == "nack"]
    assert second[1] == 2 and second[2] - first[2] >= 0.25
    (letter,) = letters
    assert letter.payload == b"reject"
    assert (letter.headers[Headers.ERROR_TYPE], letter.headers[Headers.ERROR_MESSAGE]) == (
        "Reject",
        "bad customer",
    )


async def test_manual_ack_settles_only_when_the_handler_says(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    seen: list[tuple[str, int]] = []

    @app.subscriber(stream=stream, group="g", ack="manual", retry=fast_retry(3), ack_wait_s=5)
    async def handle(text: str, ctx: Context) -> None:
        seen.append((text, ctx.attempt))
        if text == "commit":
            await ctx.ack()  # e.g. right after the database commit
        # "forget" returns unsettled: pigeon nacks it, so it comes back

    async with app:
        await app.publish(f"{prefix}.t", "commit")
        await app.publish(f"{prefix}.t", "forget")
        assert await until(lambda: ("forget", 2) in seen)
        await asyncio.sleep(0.3)
    assert seen.count(("commit", 1)) == 1 and ("commit", 2) not in seen


async def test_return_value_is_published_with_correlation_and_causation(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    invoices: list[Message] = []

    @app.subscriber(f"{prefix}.orders", stream=stream, group="billing", publish_to=f"{prefix}.invoices")
    async def bill(order: Order) -> dict[str, Any]:
        return {"order": order.id, "total": order.amount}

    @app.subscriber(f"{prefix}.invoices", stream=stream, group="mail")
    async def mail(invoice: dict[str, Any], message: Message) -> None:
        invoices.append(message)

    async with app:
        ack = await app.publish(f"{prefix}.orders", Order(3, 9.0), headers={Headers.CORRELATION_ID: "conv-1"})
        assert ack is not None
        assert await until(lambda: len(invoices) == 1)
    (invoice,) = invoices
    assert invoice.payload == b'{"order":3,"total":9.0}'
    assert invoice.headers[Headers.CONTENT_TYPE] == "application/json"
    assert invoice.headers[Headers.CORRELATION_ID] == "conv-1"
    order_messages = [m async for m in _stored(any_transport, stream) if m.subject == f"{prefix}.orders"]
    assert invoice.headers[Headers.CAUSATION_ID] == order_messages[0].id


async def _stored(transport: Any, stream: str) -> Any:
    from pigeon.testing.conformance import drain
    from pigeon.transport.base import ConsumerSpec

    consumer = await transport.consumer(stream, ConsumerSpec(unique_name("reader")))
    try:
        for received in await drain(consumer, 2):
            yield received.message
    finally:
        await consumer.close()


async def test_a_core_handler_answers_requests(any_transport: Any) -> None:
    subject = unique_name("svc").replace("-", "_") + ".price"
    app = App(any_transport)

    @app.subscriber(subject, queue="pricing")
    async def price(order: Order) -> dict[str, float]:
        return {"price": order.amount * 2}

    async with app:
        await asyncio.sleep(0.1)  # let the subscription reach the broker
        answer = await app.request(subject, Order(1, 4.0), response=dict, timeout=5)
        raw = await any_transport.request(subject, b'{"id": 2, "amount": 1.0}', timeout=5)
    assert answer == {"price": 8.0}
    assert raw.payload == b'{"price":2.0}'
    assert raw.headers[Headers.CAUSATION_ID], "a reply is caused by its request"


class TaggingCodec:
    """A codec of its own: the payload is "<subject>|<text>", so the test sees which subject
    each encode and decode was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def encode(self, value: Any, subject: str) -> tuple[bytes, dict[str, str]]:
        self.seen.append(("encode", subject))
        return f"{subject}|{value}".encode(), {"Content-Type": "text/x-tagged"}

    async def decode(self, payload: bytes, target: Any, subject: str) -> Any:
        self.seen.append(("decode", subject))
        tagged, _, text = payload.decode().partition("|")
        assert tagged == subject, "the codec was told another subject than the one it encoded for"
        return text


async def test_a_codec_of_ones_own_encodes_and_decodes_every_payload(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    codec = TaggingCodec()
    app = App(any_transport, codec=codec)
    got: list[str] = []

    @app.subscriber(f"{prefix}.in", stream=stream, group="g", publish_to=f"{prefix}.out")
    async def shout(text: str) -> str:
        return text.upper()

    @app.subscriber(f"{prefix}.out", stream=stream, group="collector")
    async def collect(text: str, message: Message) -> None:
        assert message.headers["Content-Type"] == "text/x-tagged"
        got.append(text)

    async with app:
        await app.publish(f"{prefix}.in", "hello")
        assert await until(lambda: got == ["HELLO"]), got
    assert ("encode", f"{prefix}.in") in codec.seen and ("encode", f"{prefix}.out") in codec.seen
    assert ("decode", f"{prefix}.in") in codec.seen and ("decode", f"{prefix}.out") in codec.seen


async def test_middleware_runs_app_level_outside_handler_level(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    trail: list[str] = []

    def layer(name: str) -> Any:
        async def middleware(ctx: Context, call_next: Any) -> Any:
            trail.append(f"{name}>")
            result = await call_next(ctx)
            trail.append(f"<{name}")
            return result

        return middleware

    app = App(any_transport, middleware=[layer("app1"), layer("app2")])

    @app.subscriber(stream=stream, group="g", middleware=[layer("handler")])
    async def handle(text: str) -> None:
        trail.append("call")

    async with app:
        await app.publish(f"{prefix}.x", "hi")
        assert await until(lambda: len(trail) == 7)
    assert trail == ["app1>", "app2>", "handler>", "call", "<handler", "<app2", "<app1"]


async def test_a_redrive_meant_for_another_group_is_skipped(any_transport: Any, make_stream: Any) -> None:
    stream, prefix = await make_stream()
    app = App(any_transport)
    billing: list[str] = []
    shipping: list[str] = []

    @app.subscriber(stream=stream, group="billing")
    async def bill(text: str) -> None:
        billing.append(text)

    @app.subscriber(stream=stream, group="shipping")
    async def ship(text: str) -> None:
        shipping.append(text)

    async with app:
        await app.publish(f"{prefix}.o", "first")
        await app.publish(f"{prefix}.o", "again", headers={Headers.REDRIVE_FOR: "billing"})
        await app.publish(f"{prefix}.o", "last")
        assert await until(lambda: len(billing) == 3 and len(shipping) == 2)
        assert (await any_transport.lag(stream, "shipping"))[0].lag == 0, "skipped, but acknowledged"
    assert billing == ["first", "again", "last"] and shipping == ["first", "last"]


def test_bad_handlers_are_refused_at_registration() -> None:
    app = App("memory://")

    def sync(payload: bytes) -> None: ...

    async def two_payloads(a: bytes, b: str) -> None: ...

    async def single(a: bytes) -> None: ...

    async def contexts(items: list[bytes], ctx: list[Context]) -> None: ...

    with pytest.raises(InvalidHandlerError, match="async"):
        app.subscriber("a.b")(sync)  # type: ignore[arg-type]
    with pytest.raises(InvalidHandlerError, match="second payload"):
        app.subscriber("a.b")(two_payloads)
    with pytest.raises(InvalidHandlerError, match="list"):
        from pigeon.app import Batch

        app.subscriber("a.b", stream="s", group="g", batch=Batch())(single)
    with pytest.raises(InvalidHandlerError, match="batch"):
        app.subscriber("a.b")(contexts)
    with pytest.raises(InvalidHandlerError, match="both"):
        app.subscriber("a.b", stream="s")
    with pytest.raises(InvalidHandlerError, match="queue"):
        app.subscriber(stream="s", group="g", queue="q")
