"""Confluent's own Python client and Avro serializers against a real pigeon registry.

confluent-kafka's ``SchemaRegistryClient`` is synchronous, so the registry runs on its own event
loop in a thread while the test talks to it over HTTP.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("confluent_kafka")
from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from pigeon.testing.services import unique_name
from registry_helpers import RegistryThread
from serve_process import Served


@pytest.fixture
def registry_url(data_dir: Path) -> Iterator[str]:
    with RegistryThread(data_dir) as served:
        yield served.url


@pytest.fixture
def client(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url})


def avro(name: str, *fields: dict[str, object]) -> Schema:
    return Schema(json.dumps({"type": "record", "name": name, "fields": list(fields)}), "AVRO")


USER_V1 = avro("User", {"name": "name", "type": "string"})
USER_V2 = avro("User", {"name": "name", "type": "string"}, {"name": "age", "type": "int", "default": 0})
USER_BAD = avro("User", {"name": "name", "type": "string"}, {"name": "email", "type": "string"})


def test_register_and_fetch(client: SchemaRegistryClient) -> None:
    subject = unique_name("users-value")
    schema_id = client.register_schema(subject, USER_V1)
    assert client.register_schema(subject, USER_V1) == schema_id
    fetched = client.get_schema(schema_id)
    assert json.loads(fetched.schema_str) == json.loads(USER_V1.schema_str)
    latest = client.get_latest_version(subject)
    assert (latest.schema_id, latest.version) == (schema_id, 1)
    assert client.get_version(subject, 1).schema_id == schema_id
    assert client.lookup_schema(subject, USER_V1).version == 1
    assert subject in client.get_subjects()
    assert client.get_versions(subject) == [1]
    assert "AVRO" in client.get_schema_types()


def test_evolution_compatibility_and_config(client: SchemaRegistryClient) -> None:
    subject = unique_name("users-value")
    client.register_schema(subject, USER_V1)
    assert client.test_compatibility(subject, USER_V2) is True
    assert client.test_compatibility(subject, USER_BAD) is False
    assert client.register_schema(subject, USER_V2) > 0
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, USER_BAD)
    assert refused.value.http_status_code == 409
    assert refused.value.error_code == 40901

    assert client.get_compatibility() == "BACKWARD"
    assert client.set_compatibility(subject, "NONE") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"
    assert client.test_compatibility_all_versions(subject, USER_BAD) is True
    client.register_schema(subject, USER_BAD)
    assert client.get_versions(subject) == [1, 2, 3]


def test_mode(client: SchemaRegistryClient) -> None:
    subject = unique_name("users-value")
    assert client.get_global_mode() == "READWRITE"
    assert client.update_mode(subject, "READONLY") == "READONLY"
    assert client.get_mode(subject) == "READONLY"
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, USER_V1)
    assert refused.value.error_code == 42205
    client.delete_mode(subject)
    client.register_schema(subject, USER_V1)


def test_delete_soft_then_permanent(client: SchemaRegistryClient) -> None:
    subject = unique_name("users-value")
    client.register_schema(subject, USER_V1)
    client.register_schema(subject, USER_V2)
    assert client.delete_version(subject, 1) == 1
    assert client.get_versions(subject) == [2]
    assert client.delete_version(subject, 1, permanent=True) == 1
    assert client.delete_subject(subject) == [2]
    assert subject not in client.get_subjects()
    with pytest.raises(SchemaRegistryError) as refused:
        client.delete_subject(subject)
    assert refused.value.error_code == 40404
    assert client.delete_subject(subject, permanent=True) == [2]
    with pytest.raises(SchemaRegistryError) as missing:
        client.get_versions(subject)
    assert missing.value.error_code == 40401


def test_references(client: SchemaRegistryClient) -> None:
    topic = unique_name("orders")
    address_subject, order_subject = unique_name("address"), f"{topic}-value"
    address = Schema(
        json.dumps(
            {
                "type": "record",
                "name": "Address",
                "namespace": "shop",
                "fields": [{"name": "city", "type": "string"}],
            }
        ),
        "AVRO",
    )
    client.register_schema(address_subject, address)
    order = Schema(
        json.dumps(
            {
                "type": "record",
                "name": "Order",
                "namespace": "shop",
                "fields": [{"name": "id", "type": "long"}, {"name": "ship_to", "type": "shop.Address"}],
            }
        ),
        "AVRO",
        [SchemaReference("shop.Address", address_subject, 1)],
    )
    order_id = client.register_schema(order_subject, order)
    fetched = client.get_schema(order_id)
    assert [(r.name, r.subject, r.version) for r in fetched.references] == [
        ("shop.Address", address_subject, 1)
    ]
    with pytest.raises(SchemaRegistryError) as referenced:
        client.delete_version(address_subject, 1)
    assert referenced.value.error_code == 42206

    # The serializer resolves the reference through the registry too.
    serializer = AvroSerializer(
        client, order, conf={"auto.register.schemas": False, "use.latest.version": True}
    )
    deserializer = AvroDeserializer(client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    value = {"id": 7, "ship_to": {"city": "Lyon"}}
    assert deserializer(serializer(value, ctx), ctx) == value


def test_serializer_round_trip_and_evolution(client: SchemaRegistryClient) -> None:
    topic = unique_name("users")
    ctx = SerializationContext(topic, MessageField.VALUE)
    old_writer = AvroSerializer(client, USER_V1.schema_str)
    data = old_writer({"name": "ada"}, ctx)
    assert data[0] == 0  # Confluent's wire format: magic byte, then the id
    schema_id = int.from_bytes(data[1:5], "big")
    assert client.get_latest_version(f"{topic}-value").schema_id == schema_id
    assert AvroDeserializer(client)(data, ctx) == {"name": "ada"}

    new_writer = AvroSerializer(client, USER_V2.schema_str)
    newer = new_writer({"name": "bob", "age": 36}, ctx)
    assert int.from_bytes(newer[1:5], "big") != schema_id
    # A reader on the new schema fills the added field's default into old data.
    reader = AvroDeserializer(client, USER_V2.schema_str)
    assert reader(data, ctx) == {"name": "ada", "age": 0}
    assert reader(newer, ctx) == {"name": "bob", "age": 36}
    with pytest.raises(SchemaRegistryError) as refused:
        AvroSerializer(client, USER_BAD.schema_str)({"name": "c", "email": "c@x"}, ctx)
    assert refused.value.http_status_code == 409


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_pigeon_serve_registry_port_with_a_token(tmp_path: Path) -> None:
    """`pigeon serve --registry-port`: the registry at the root of its own port, where Confluent
    clients expect it; with --token, Basic auth carries the token as its password."""
    port = _free_port()
    served = Served(tmp_path / "data", 0, "--registry-port", str(port), "--token", "s3cret").wait_listening()
    try:
        url = f"http://127.0.0.1:{port}"
        subject = unique_name("orders-value")
        anonymous = SchemaRegistryClient({"url": url})
        with pytest.raises(SchemaRegistryError) as refused:
            anonymous.register_schema(subject, USER_V1)
        assert refused.value.http_status_code == 401
        client = SchemaRegistryClient({"url": url, "basic.auth.user.info": "anyone:s3cret"})
        schema_id = client.register_schema(subject, USER_V1)
        mounted = httpx.get(
            f"{served.http_url}/registry/schemas/ids/{schema_id}", headers={"Authorization": "Bearer s3cret"}
        )
        assert json.loads(mounted.json()["schema"]) == json.loads(USER_V1.schema_str)
        assert httpx.get(f"{served.http_url}/registry/subjects").status_code == 401
    finally:
        assert served.stop(signal.SIGINT) == 0, served.stderr()


def test_pigeon_registry_runs_alone_and_refuses_exposure_without_a_token(tmp_path: Path) -> None:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "pigeon.cli",
        "registry",
        "--data",
        str(tmp_path / "d"),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = SchemaRegistryClient({"url": f"http://127.0.0.1:{port}"})
        for _ in range(200):
            try:
                schema_id = client.register_schema(unique_name("alone-value"), USER_V1)
                break
            except Exception:  # not listening yet
                time.sleep(0.05)
        else:
            raise AssertionError("pigeon registry did not answer")
        assert client.get_schema(schema_id).schema_type == "AVRO"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    exposed = subprocess.run([*command, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=30)
    assert exposed.returncode == 1
    assert exposed.stderr.strip().startswith(
        "pigeon registry: refusing to serve the schema registry on 0.0.0.0"
    )


def _json_schema(properties: tuple[str, ...], required: tuple[str, ...]) -> Schema:
    """A closed object schema: ``id`` an integer, anything else a string."""
    document = {
        "type": "object",
        "properties": {name: {"type": "integer" if name == "id" else "string"} for name in properties},
        "required": list(required),
        "additionalProperties": False,
    }
    return Schema(json.dumps(document), "JSON")


PROTO_V1 = 'syntax = "proto3";\npackage shop;\nmessage Ticket {\n  int64 id = 1;\n}\n'
PROTO_V2 = 'syntax = "proto3";\npackage shop;\nmessage Ticket {\n  int64 id = 1;\n  string note = 2;\n}\n'
PROTO_BAD = 'syntax = "proto3";\npackage shop;\nmessage Ticket {\n  string id = 1;\n}\n'


@pytest.mark.parametrize(
    ("first", "compatible", "incompatible"),
    [
        (
            _json_schema(("id",), ("id",)),
            _json_schema(("id", "note"), ("id",)),  # an optional property added
            _json_schema(("id", "note"), ("id", "note")),  # a required one: old data lacks it
        ),
        (Schema(PROTO_V1, "PROTOBUF"), Schema(PROTO_V2, "PROTOBUF"), Schema(PROTO_BAD, "PROTOBUF")),
    ],
    ids=["json", "protobuf"],
)
def test_json_and_protobuf_schemas_evolve_under_the_rules(
    client: SchemaRegistryClient, first: Schema, compatible: Schema, incompatible: Schema
) -> None:
    subject = unique_name("evolving-value")
    first_id = client.register_schema(subject, first)
    assert client.get_schema(first_id).schema_type == first.schema_type
    assert client.register_schema(subject, first) == first_id  # the same schema again: the same id
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, incompatible)
    assert refused.value.http_status_code == 409
    assert not client.test_compatibility(subject, incompatible)
    assert client.test_compatibility(subject, compatible)
    second = client.register_schema(subject, compatible)
    assert second != first_id
    assert client.get_latest_version(subject).version == 2
