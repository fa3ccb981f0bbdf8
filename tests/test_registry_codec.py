"""RegistryCodec: pigeon apps publishing and handling Confluent wire-format payloads through a
real registry, and bytes exchanged both ways with confluent-kafka's own serializers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import until
from pigeon.app import App
from pigeon.errors import PayloadDecodeError, PayloadEncodeError
from pigeon.registry.client import RegistryClient
from pigeon.registry.codec import RegistryCodec
from pigeon.registry.errors import IncompatibleSchemaError, SubjectNotFoundError
from pigeon.registry.schemas import AvroSchema, JsonSchema, ProtobufSchema
from pigeon.registry.wire import frame, read_message_indexes, unframe, write_message_indexes
from pigeon.server.registry import RegistryOptions, running
from pigeon.testing.services import unique_name
from pigeon.transport import connect
from pigeon.transport.base import StreamSpec, Transport
from registry_helpers import RegistryThread

confluent = pytest.importorskip("confluent_kafka.schema_registry")
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer  # noqa: E402
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer  # noqa: E402
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402


@dataclasses.dataclass
class Order:
    id: int
    amount: float


@dataclasses.dataclass
class OrderV2:
    id: int
    amount: float
    currency: str = "EUR"


class Payment(pydantic.BaseModel):
    order: int
    cents: int


ORDER_V1 = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [{"name": "id", "type": "long"}, {"name": "amount", "type": "double"}],
    }
)
ORDER_V2 = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "amount", "type": "double"},
            {"name": "currency", "type": "string", "default": "EUR"},
        ],
    }
)
PAYMENT = json.dumps(
    {
        "title": "Payment",
        "type": "object",
        "properties": {"order": {"type": "integer"}, "cents": {"type": "integer", "minimum": 0}},
        "required": ["order", "cents"],
    }
)


@pytest.fixture
async def registry(data_dir: Path) -> AsyncIterator[RegistryClient]:
    async with (
        running(RegistryOptions(data=data_dir / "registry", port=0)) as http,
        RegistryClient(http.url) as client,
    ):
        yield client


@pytest.fixture
async def transport(tmp_path: Path) -> AsyncIterator[Transport]:
    opened = await connect(f"file://{tmp_path / 'broker'}")
    await opened.create_stream(StreamSpec("shop", ("shop.>",)))
    yield opened
    await opened.close()


async def test_an_app_publishes_and_handles_registered_types(
    registry: RegistryClient, transport: Transport
) -> None:
    codec = RegistryCodec(registry, {Order: AvroSchema(ORDER_V1), Payment: JsonSchema(PAYMENT)})
    app = App(transport, codec=codec)
    orders: list[Order] = []
    payments: list[Payment] = []

    @app.subscriber("shop.orders", stream="shop", group="billing")
    async def bill(order: Order) -> None:
        orders.append(order)

    @app.subscriber("shop.payments", stream="shop", group="ledger")
    async def record(payment: Payment) -> None:
        payments.append(payment)

    async with app:
        await app.publish("shop.orders", Order(7, 9.5))
        await app.publish("shop.payments", Payment(order=7, cents=950))
        assert await until(lambda: bool(orders and payments))
    assert orders == [Order(7, 9.5)] and payments == [Payment(order=7, cents=950)]
    stored = [m async for m in transport.engine.read("shop", 0)]  # type: ignore[attr-defined]
    schema_id, _ = unframe(stored[0].payload)
    assert (await registry.schema(schema_id)).schema_type == "AVRO"
    assert await registry.register("shop.orders-value", ORDER_V1, auto_register=False) == schema_id
    assert stored[1].payload[0] == 0 and stored[1].headers["Content-Type"].startswith(
        "application/vnd.pigeon.json"
    )


async def test_a_value_that_does_not_match_is_refused_before_anything_is_sent(
    registry: RegistryClient, transport: Transport
) -> None:
    app = App(
        transport, codec=RegistryCodec(registry, {Order: AvroSchema(ORDER_V1), Payment: JsonSchema(PAYMENT)})
    )
    with pytest.raises(PayloadEncodeError, match="does not match Avro schema"):
        await app.publish("shop.orders", Order("seven", 9.5))  # type: ignore[arg-type]
    with pytest.raises(PayloadEncodeError, match="cents"):
        await app.publish("shop.payments", Payment.model_construct(order=1, cents=-5))
    with pytest.raises(PayloadEncodeError, match="no schema for dict"):
        await app.publish("shop.orders", {"id": 1})
    assert (await transport.stream_state("shop")).messages == 0
    lookup_only = App(
        transport, codec=RegistryCodec(registry, {Order: AvroSchema(ORDER_V1)}, auto_register=False)
    )
    with pytest.raises(SubjectNotFoundError):
        await lookup_only.publish("shop.orders", Order(1, 1.0))


async def test_subject_name_strategies(registry: RegistryClient) -> None:
    schema = AvroSchema(ORDER_V1)
    assert RegistryCodec(registry).registry_subject("shop.orders", schema) == "shop.orders-value"
    record = RegistryCodec(registry, strategy="record_name")
    assert record.registry_subject("shop.orders", schema) == "shop.Order"
    both = RegistryCodec(registry, {Order: schema}, strategy="topic_record_name")
    assert both.registry_subject("shop.orders", schema) == "shop.orders-shop.Order"
    payload, _ = await both.encode(Order(1, 2.0), "shop.orders")
    assert (
        await registry.register("shop.orders-shop.Order", ORDER_V1, auto_register=False)
        == unframe(payload)[0]
    )


async def test_evolution_old_and_new_readers_and_writers(registry: RegistryClient) -> None:
    old = RegistryCodec(registry, {Order: AvroSchema(ORDER_V1)})
    new = RegistryCodec(registry, {OrderV2: AvroSchema(ORDER_V2)})
    written_old, _ = await old.encode(Order(1, 2.0), "shop.orders")
    written_new, _ = await new.encode(OrderV2(2, 3.0, "USD"), "shop.orders")  # BACKWARD: accepted
    assert await new.decode(written_old, OrderV2) == OrderV2(1, 2.0, "EUR")  # the reader's default
    assert await old.decode(written_new, Order) == Order(2, 3.0)  # the new field is skipped
    assert await new.decode(written_new, dict) == {"id": 2, "amount": 3.0, "currency": "USD"}
    assert await new.decode(written_new, bytes) == written_new
    dropped = json.dumps({"type": "record", "name": "Order", "namespace": "shop", "fields": [
        {"name": "id", "type": "long"}, {"name": "note", "type": "string"}]})  # fmt: skip

    @dataclasses.dataclass
    class Bad:
        id: int
        note: str

    with pytest.raises(IncompatibleSchemaError):
        await RegistryCodec(registry, {Bad: AvroSchema(dropped)}).encode(Bad(1, "x"), "shop.orders")


async def test_payloads_that_do_not_decode_are_poison(registry: RegistryClient) -> None:
    codec = RegistryCodec(registry, {Order: AvroSchema(ORDER_V1)})
    with pytest.raises(PayloadDecodeError, match="wire format"):
        await codec.decode(b'{"id": 1}', Order)
    with pytest.raises(PayloadDecodeError, match="cannot read schema 4242"):
        await codec.decode(frame(4242, b""), Order)
    good, _ = await codec.encode(Order(1, 2.0), "shop.orders")
    with pytest.raises(PayloadDecodeError):
        await codec.decode(good[:6], Order)  # truncated


@given(st.lists(st.integers(min_value=0, max_value=2**31), min_size=1, max_size=5), st.binary(max_size=20))
def test_protobuf_message_indexes_round_trip(indexes: list[int], rest: bytes) -> None:
    assert read_message_indexes(write_message_indexes(indexes) + rest) == (indexes, rest)
    assert write_message_indexes([0]) == b"\x00"


# -- the same bytes as confluent-kafka's serializers --------------------------------------------


@pytest.fixture
def threaded_registry(data_dir: Path) -> Iterator[str]:
    with RegistryThread(data_dir / "registry") as served:
        yield served.url


async def test_bytes_cross_with_confluent_avro_and_json_serializers(threaded_registry: str) -> None:
    client = confluent.SchemaRegistryClient({"url": threaded_registry})
    topic = unique_name("topic")
    context = SerializationContext(topic, MessageField.VALUE)
    codec = RegistryCodec(
        RegistryClient(threaded_registry), {Order: AvroSchema(ORDER_V1), Payment: JsonSchema(PAYMENT)}
    )
    try:
        theirs = AvroSerializer(client, ORDER_V1)({"id": 3, "amount": 4.5}, context)
        assert await codec.decode(theirs, Order) == Order(3, 4.5)
        ours, _ = await codec.encode(Order(5, 6.5), topic)
        assert AvroDeserializer(client)(ours, context) == {"id": 5, "amount": 6.5}

        json_topic = unique_name("topic")
        json_context = SerializationContext(json_topic, MessageField.VALUE)
        theirs = JSONSerializer(PAYMENT, client)({"order": 1, "cents": 2}, json_context)
        assert await codec.decode(theirs, Payment) == Payment(order=1, cents=2)
        ours, _ = await codec.encode(Payment(order=3, cents=4), json_topic)
        assert JSONDeserializer(PAYMENT, schema_registry_client=client)(ours, json_context) == {
            "order": 3,
            "cents": 4,
        }
    finally:
        await codec.client.close()


def _invoice_class() -> Any:
    """A protobuf message class as protoc would generate it (built here: no protoc needed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="shop/invoice.proto", package="shop", syntax="proto3")
    invoice = file.message_type.add(name="Invoice")
    invoice.field.add(name="id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    invoice.field.add(name="customer", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Invoice"))


Invoice = _invoice_class()


async def test_protobuf_messages_through_an_app(registry: RegistryClient, transport: Transport) -> None:
    app = App(transport, codec=RegistryCodec(registry))  # a protobuf class is its own schema
    got: list[Any] = []

    @app.subscriber("shop.invoices", stream="shop", group="mail")
    async def mail(invoice: Invoice) -> None:  # type: ignore[valid-type]
        got.append(invoice)

    async with app:
        await app.publish("shop.invoices", Invoice(id=3, customer="ada"))
        assert await until(lambda: bool(got))
    assert got == [Invoice(id=3, customer="ada")]
    with pytest.raises(PayloadEncodeError, match=r"expected a shop\.Invoice"):
        await RegistryCodec(registry, {Order: ProtobufSchema(Invoice)}).encode(Order(1, 1.0), "shop.invoices")


async def test_bytes_cross_with_confluent_protobuf_serializers(threaded_registry: str) -> None:
    client = confluent.SchemaRegistryClient({"url": threaded_registry})
    topic = unique_name("topic")
    context = SerializationContext(topic, MessageField.VALUE)
    codec = RegistryCodec(RegistryClient(threaded_registry))
    conf = {"use.deprecated.format": False}
    try:
        theirs = ProtobufSerializer(Invoice, client, conf)(Invoice(id=1, customer="bob"), context)
        assert await codec.decode(theirs, Invoice) == Invoice(id=1, customer="bob")
        ours, _ = await codec.encode(Invoice(id=2, customer="eve"), topic)
        assert ProtobufDeserializer(Invoice, conf)(ours, context) == Invoice(id=2, customer="eve")
        assert unframe(ours)[0] == unframe(theirs)[0], "the same schema, registered once"
    finally:
        await codec.client.close()
