"""Protobuf schemas: .proto text (proto2 or proto3) or, as Confluent's serializers register them,
a base64 ``FileDescriptorProto``; compared with Confluent's rules.

References name the files the schema imports by their import path ("other.proto"); the
well-known ``google/protobuf/*.proto`` files need none.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._proto_diff import check
from ._proto_files import canonical_text, load_imports, parse_source
from ._proto_model import ProtoSchema, build

__all__ = ["FORMAT", "ProtobufFormat"]


class ProtobufFormat:
    type_name = "PROTOBUF"

    def parse(self, text: str, references: Mapping[str, str]) -> ProtoSchema:
        root = parse_source("", text)
        imported, opaque = load_imports(root, references)
        return build(root, imported, opaque)

    def canonical(self, parsed: ProtoSchema) -> str:
        return canonical_text(parsed.source.tree)

    def incompatibilities(self, reader: ProtoSchema, writer: ProtoSchema) -> list[str]:
        return [str(difference) for difference in check(reader, writer)]


FORMAT = ProtobufFormat()
