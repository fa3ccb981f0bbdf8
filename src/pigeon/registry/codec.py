"""A pigeon `Codec` that writes and reads Confluent's wire format through a schema registry.

::

    codec = RegistryCodec(RegistryClient(url), {Order: AvroSchema(ORDER_AVSC), Payment: JsonSchema(...)})
    app = App(transport, codec=codec)

Publishing a value looks up the schema given for its type (a generated protobuf class needs
none: it is its own schema), registers it (or only looks it up, ``auto_register=False``) under
the subject the strategy names, refuses a value that does not match, and writes magic byte,
schema id and payload. A handler's annotation says what it gets: the registered type (a
dataclass or pydantic model built from the record, or the protobuf message), ``dict``/``Any``
for the record as decoded, ``bytes`` for the payload as stored. An Avro payload is read with
the writer's schema from the registry, resolved against the reader's schema when the target
type has one, so old and new versions read each other as the compatibility rules promise.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import InvalidConfigError, PayloadDecodeError, PayloadEncodeError, PigeonError
from .client import RegistryClient
from .schemas import AvroSchema, JsonSchema, ProtobufSchema, WriterSchema
from .wire import frame, unframe

__all__ = ["RegistryCodec", "SubjectStrategy"]

SubjectStrategy = Literal["topic_name", "record_name", "topic_record_name"]
Schema = AvroSchema | JsonSchema | ProtobufSchema
_CONTENT_TYPES = {
    "AVRO": "application/vnd.pigeon.avro+confluent",
    "JSON": "application/vnd.pigeon.json+confluent",
    "PROTOBUF": "application/vnd.pigeon.protobuf+confluent",
}


class RegistryCodec:
    def __init__(
        self,
        client: RegistryClient,
        schemas: Mapping[type, Schema] | None = None,
        *,
        strategy: SubjectStrategy = "topic_name",
        auto_register: bool = True,
    ) -> None:
        if strategy not in ("topic_name", "record_name", "topic_record_name"):
            raise InvalidConfigError(
                f"subject strategy must be topic_name, record_name or topic_record_name, not {strategy!r}"
            )
        for kind, schema in (schemas or {}).items():
            if not isinstance(kind, type) or not isinstance(schema, AvroSchema | JsonSchema | ProtobufSchema):
                raise InvalidConfigError(
                    "schemas maps types to AvroSchema, JsonSchema or ProtobufSchema, "
                    f"not {kind!r}: {schema!r}"
                )
        self.client = client
        self.strategy = strategy
        self.auto_register = auto_register
        self._schemas: dict[type, Schema] = dict(schemas or {})
        self._writers: dict[int, WriterSchema] = {}

    def registry_subject(self, subject: str, schema: Schema) -> str:
        """The registry subject a value published to ``subject`` is registered under."""
        if self.strategy == "topic_name":
            return f"{subject}-value"
        if not schema.record_name:
            raise PayloadEncodeError(
                f"the {self.strategy} strategy needs a record name: the schema has none "
                "(an Avro record's name, a JSON schema's title)"
            )
        if self.strategy == "record_name":
            return schema.record_name
        return f"{subject}-{schema.record_name}"

    async def encode(self, value: Any, subject: str) -> tuple[bytes, dict[str, str]]:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value), {}  # already encoded: sent as it is
        schema = self._schema_for(type(value))
        if schema is None:
            raise PayloadEncodeError(
                f"no schema for {type(value).__name__}: give RegistryCodec(schemas={{{type(value).__name__}: "
                "AvroSchema(...) or JsonSchema(...)}})"
            )
        payload = schema.encode(value)  # refuses a value that does not match, before registering
        schema_id = await self.client.register(
            self.registry_subject(subject, schema),
            schema.text,
            schema.schema_type,
            schema.references,
            auto_register=self.auto_register,
        )
        return frame(schema_id, payload), {"Content-Type": _CONTENT_TYPES[schema.schema_type]}

    async def decode(self, payload: bytes, target: Any, subject: str = "") -> Any:
        if target is bytes or target is None:
            return payload
        schema_id, body = unframe(payload)
        writer = self._writers.get(schema_id)
        if writer is None:
            try:
                writer = WriterSchema(await self.client.schema(schema_id))
            except PigeonError as error:
                raise PayloadDecodeError(f"cannot read schema {schema_id}: {error}") from None
            self._writers[schema_id] = writer
        reader = self._schema_for(target) if isinstance(target, type) else None
        value = writer.decode(body, target if isinstance(reader, ProtobufSchema) else reader)
        return _as(value, target)

    def _schema_for(self, kind: type) -> Schema | None:
        found = self._schemas.get(kind)
        if found is None and _is_protobuf_message(kind):
            found = self._schemas[kind] = ProtobufSchema(kind)
        return found


def _is_protobuf_message(kind: type) -> bool:
    try:
        from google.protobuf.message import Message
    except ImportError:
        return False
    return isinstance(kind, type) and issubclass(kind, Message) and kind is not Message


def _as(value: Any, target: Any) -> Any:
    """The decoded record as the handler's annotation asks."""
    if _is_protobuf_message(target) or target is Any or target is dict:
        return value
    try:
        if isinstance(target, type) and callable(getattr(target, "model_validate", None)):
            return target.model_validate(value)  # type: ignore[attr-defined]
        if dataclasses.is_dataclass(target) and isinstance(target, type):
            return target(**value)
    except Exception as error:  # the model's own validation error
        raise PayloadDecodeError(f"payload does not decode to {target.__name__}: {error}") from None
    expected = typing.get_origin(target) or target
    if isinstance(expected, type) and not isinstance(value, expected):
        raise PayloadDecodeError(f"payload decodes to {type(value).__name__}, not {expected.__name__}")
    return value
