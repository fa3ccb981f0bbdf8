"""The schemas a `RegistryCodec` writes with: Avro, JSON Schema and Protobuf.

Each knows its registry type and text, the record name the subject strategies use, how to
turn a value into payload bytes (refusing a value that does not match), and how to read bytes
written under a writer schema from the registry.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from ..errors import PayloadDecodeError, PayloadEncodeError
from .client import RegisteredSchema, SchemaReference
from .wire import read_message_indexes, write_message_indexes

__all__ = ["AvroSchema", "JsonSchema", "ProtobufSchema", "WriterSchema", "plain"]


def plain(value: Any) -> Any:
    """A dataclass or pydantic model as the dict a schema validates; other values as they are."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclasses.dataclass(frozen=True)
class AvroSchema:
    """An Avro schema (JSON text); ``references`` name registered schemas it uses by name."""

    text: str
    references: tuple[SchemaReference, ...] = ()
    referenced: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    schema_type = "AVRO"

    @cached_property
    def parsed(self) -> Any:
        return _parse_avro(self.text, self.referenced)

    @property
    def record_name(self) -> str:
        parsed = self.parsed
        return str(parsed.get("name", "")) if isinstance(parsed, dict) else ""

    def encode(self, value: Any) -> bytes:
        import fastavro
        from fastavro.validation import ValidationError

        record = plain(value)
        try:
            fastavro.validation.validate(record, self.parsed, raise_errors=True)
            out = io.BytesIO()
            fastavro.schemaless_writer(out, self.parsed, record)
        except (ValidationError, TypeError, ValueError) as error:
            raise PayloadEncodeError(
                f"value does not match Avro schema {self.record_name!r}: {error}"
            ) from None
        return out.getvalue()


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """A JSON Schema document (text)."""

    text: str
    references: tuple[SchemaReference, ...] = ()
    schema_type = "JSON"

    @cached_property
    def document(self) -> Any:
        return json.loads(self.text)

    @property
    def record_name(self) -> str:
        title = self.document.get("title") if isinstance(self.document, dict) else None
        return str(title or "")

    def encode(self, value: Any) -> bytes:
        record = plain(value)
        problem = _json_problem(self.document, record)
        if problem is not None:
            raise PayloadEncodeError(f"value does not match JSON schema {self.record_name!r}: {problem}")
        return json.dumps(record, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class ProtobufSchema:
    """A generated protobuf message class; its file descriptor is the registered schema, sent as
    Confluent's clients do (the serialized ``FileDescriptorProto``, base64)."""

    message_class: Any
    references: tuple[SchemaReference, ...] = ()
    schema_type = "PROTOBUF"

    @property
    def text(self) -> str:
        return base64.standard_b64encode(self.message_class.DESCRIPTOR.file.serialized_pb).decode()

    @property
    def record_name(self) -> str:
        return str(self.message_class.DESCRIPTOR.full_name)

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.message_class):
            raise PayloadEncodeError(f"expected a {self.record_name} message, not {type(value).__name__}")
        message: bytes = value.SerializeToString()
        return write_message_indexes(_message_indexes(self.message_class.DESCRIPTOR)) + message


class WriterSchema:
    """A schema fetched by id, to read the payloads written with it."""

    def __init__(self, registered: RegisteredSchema) -> None:
        self.registered = registered

    @cached_property
    def _avro(self) -> Any:
        return _parse_avro(self.registered.text, self.registered.referenced)

    def decode(self, payload: bytes, reader: Any = None) -> Any:
        """The value as a dict (Avro, JSON) or, given a protobuf ``reader`` class, a message.
        ``reader`` for Avro is the reader's `AvroSchema`, resolved against this writer."""
        kind = self.registered.schema_type
        try:
            if kind == "AVRO":
                import fastavro

                reader_schema = reader.parsed if isinstance(reader, AvroSchema) else None
                return fastavro.schemaless_reader(io.BytesIO(payload), self._avro, reader_schema)
            if kind == "JSON":
                value = json.loads(payload)
                problem = _json_problem(json.loads(self.registered.text), value)
                if problem is not None:
                    raise PayloadDecodeError(f"payload does not match its JSON schema: {problem}")
                return value
            if kind == "PROTOBUF":
                _, message = read_message_indexes(payload)
                if reader is None:
                    raise PayloadDecodeError("a protobuf payload needs a message class to decode into")
                return reader.FromString(message)
        except PayloadDecodeError:
            raise
        except Exception as error:  # each library reports bad bytes its own way
            raise PayloadDecodeError(
                f"payload does not decode with schema {self.registered.schema_id}: {error}"
            ) from None
        raise PayloadDecodeError(f"schema {self.registered.schema_id} has an unknown type {kind!r}")


def _parse_avro(text: str, referenced: Mapping[str, str]) -> Any:
    import fastavro

    named: dict[str, Any] = {}
    for reference_text in referenced.values():
        fastavro.parse_schema(json.loads(reference_text), named_schemas=named)
    return fastavro.parse_schema(json.loads(text), named_schemas=named)


def _json_problem(document: Any, value: Any) -> str | None:
    import jsonschema

    validator = jsonschema.validators.validator_for(document)(document)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the value"
    return f"{where}: {error.message}"


def _message_indexes(descriptor: Any) -> list[int]:
    """Where a message type sits in its file: its index, inside each enclosing type's."""
    path: list[int] = []
    while descriptor.containing_type is not None:
        parent = descriptor.containing_type
        path.insert(0, list(parent.nested_types).index(descriptor))
        descriptor = parent
    path.insert(0, list(descriptor.file.message_types_by_name.values()).index(descriptor))
    return path
