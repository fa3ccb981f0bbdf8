"""Avro schemas: parsed with the ``avro`` library, compared with Avro's schema resolution rules."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import avro.schema
from avro.name import Names

from ..errors import InvalidSchemaError
from ._avro_resolution import check

__all__ = ["FORMAT", "AvroFormat", "ParsedAvro"]


@dataclass(frozen=True, eq=False)
class ParsedAvro:
    schema: avro.schema.Schema
    # Named types the references define: the canonical text names them instead of inlining
    # them, so a schema keeps its identity when only a referenced schema changes.
    referenced: Mapping[str, avro.schema.NamedSchema]


class AvroFormat:
    type_name = "AVRO"

    def parse(self, text: str, references: Mapping[str, str]) -> ParsedAvro:
        names = Names()
        for name, reference_text in references.items():
            _build(reference_text, names, f"referenced schema {name!r}")
        referenced = dict(names.names)
        return ParsedAvro(_build(text, names, "schema"), referenced)

    def canonical(self, parsed: ParsedAvro) -> str:
        names = Names()
        names.names = dict(parsed.referenced)
        return json.dumps(parsed.schema.to_json(names), sort_keys=True, separators=(",", ":"))

    def incompatibilities(self, reader: ParsedAvro, writer: ParsedAvro) -> list[str]:
        return [str(problem) for problem in check(reader.schema, writer.schema)]


def _build(text: str, names: Names, what: str) -> avro.schema.Schema:
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise InvalidSchemaError(f"invalid Avro {what}: not JSON: {error}") from None
    try:
        return avro.schema.make_avsc_object(data, names)
    # The library signals malformed schemas with its own exceptions but also with TypeError,
    # AttributeError and friends on unexpected JSON shapes; all of them are the user's mistake.
    except Exception as error:
        raise InvalidSchemaError(f"invalid Avro {what}: {error}") from None


FORMAT = AvroFormat()
