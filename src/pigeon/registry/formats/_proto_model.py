"""Protobuf syntax trees resolved into the messages and field types the compatibility rules compare.

Type names are resolved as protoc does, innermost scope first, across the schema and the files it
imports. A name that resolves nowhere is an invalid schema, unless the schema imports a builtin
file this process cannot load (``google/type/...``, ``confluent/...``): its types are then taken
as messages known only by name, as Confluent does for types it cannot resolve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proto_schema_parser import ast

from ..errors import InvalidSchemaError
from ._proto_files import ProtoSource

__all__ = ["FieldType", "ProtoField", "ProtoMessage", "ProtoSchema", "build"]

SCALARS = frozenset(
    {
        "double",
        "float",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "sint32",
        "sint64",
        "fixed32",
        "fixed64",
        "sfixed32",
        "sfixed64",
        "bool",
        "string",
        "bytes",
    }
)


@dataclass(frozen=True)
class FieldType:
    kind: str  # "scalar" | "enum" | "message" | "map"
    name: str  # the scalar's name, or the type's full name (as written, when it did not resolve)
    key: FieldType | None = None  # maps only
    value: FieldType | None = None  # maps only
    resolved: bool = True


@dataclass(frozen=True)
class ProtoField:
    name: str
    number: int
    label: str | None  # "optional" | "required" | "repeated"; None when unlabelled
    type: FieldType
    oneof: str | None


@dataclass(eq=False)
class ProtoMessage:
    name: str
    full_name: str
    package: str
    source: ProtoSource
    fields: dict[int, ProtoField] = field(default_factory=dict)
    oneofs: dict[str, list[int]] = field(default_factory=dict)
    messages: dict[str, ProtoMessage] = field(default_factory=dict)  # nested, in declaration order


@dataclass(eq=False)
class ProtoSchema:
    source: ProtoSource
    syntax: str
    package: str
    messages: dict[str, ProtoMessage]  # top level, in declaration order
    all_messages: dict[str, ProtoMessage]  # by full name, the imported files' included


def build(root: ProtoSource, imported: list[ProtoSource], opaque_imports: bool) -> ProtoSchema:
    symbols = _Symbols()
    for source in [root, *imported]:
        symbols.collect(source)
    for message in symbols.messages.values():
        symbols.resolve_fields(message, opaque_imports)
    syntax = root.tree.syntax or "proto2"
    return ProtoSchema(
        root,
        syntax,
        _package(root.tree),
        {m.name: m for m in symbols.top_level[id(root)]},
        symbols.messages,
    )


def _package(tree: ast.File) -> str:
    return next((e.name for e in tree.file_elements if isinstance(e, ast.Package)), "")


class _Symbols:
    def __init__(self) -> None:
        self.messages: dict[str, ProtoMessage] = {}
        self.enums: set[str] = set()
        self.top_level: dict[int, list[ProtoMessage]] = {}
        self._trees: dict[str, ast.Message] = {}
        self._syntax: dict[str, str] = {}

    def collect(self, source: ProtoSource) -> None:
        package = _package(source.tree)
        if source.tree.edition is not None:
            raise InvalidSchemaError(
                "invalid Protobuf schema: editions are not supported, only proto2 and proto3"
            )
        syntax = source.tree.syntax or "proto2"
        if syntax not in ("proto2", "proto3"):
            raise InvalidSchemaError(f"invalid Protobuf schema: syntax {syntax!r} is not supported")
        prefix = f"{package}." if package else ""
        self.top_level[id(source)] = self._collect(source.tree.file_elements, prefix, package, source, syntax)

    def _collect(
        self, elements: Sequence[object], prefix: str, package: str, source: ProtoSource, syntax: str
    ) -> list[ProtoMessage]:
        messages = []
        for element in elements:
            if isinstance(element, ast.Enum):
                self.enums.add(prefix + element.name)
            elif isinstance(element, ast.Group):
                raise InvalidSchemaError(
                    f"invalid Protobuf schema: group {element.name!r} is not supported; use a message field"
                )
            elif isinstance(element, ast.Message):
                full_name = prefix + element.name
                if full_name in self.messages:
                    raise InvalidSchemaError(f"invalid Protobuf schema: {full_name!r} is defined twice")
                message = ProtoMessage(element.name, full_name, package, source)
                self.messages[full_name] = message
                self._trees[full_name] = element
                self._syntax[full_name] = syntax
                nested = self._collect(element.elements, f"{full_name}.", package, source, syntax)
                message.messages = {m.name: m for m in nested}
                messages.append(message)
        return messages

    def resolve_fields(self, message: ProtoMessage, opaque_imports: bool) -> None:
        def add(element: ast.Field | ast.MapField, oneof: str | None) -> None:
            if element.number in message.fields:
                raise InvalidSchemaError(
                    f"invalid Protobuf {_what(message)}: {message.full_name} uses field number "
                    f"{element.number} twice"
                )
            if isinstance(element, ast.MapField):
                key = self._type(element.key_type, message, opaque_imports)
                value = self._type(element.value_type, message, opaque_imports)
                field_type, label = FieldType("map", "map", key, value), None
            else:
                field_type, label = self._type(element.type, message, opaque_imports), _label(element)
                if label == "required" and self._syntax[message.full_name] == "proto3":
                    raise InvalidSchemaError(
                        f"invalid Protobuf {_what(message)}: {message.full_name}.{element.name}: "
                        "proto3 has no required fields"
                    )
            message.fields[element.number] = ProtoField(
                element.name, element.number, label, field_type, oneof
            )

        for element in self._trees[message.full_name].elements:
            if isinstance(element, ast.Field | ast.MapField):
                add(element, None)
            elif isinstance(element, ast.OneOf):
                members = [e for e in element.elements if isinstance(e, ast.Field | ast.MapField)]
                message.oneofs[element.name] = [member.number for member in members]
                for member in members:
                    add(member, element.name)

    def _type(self, name: str, scope: ProtoMessage, opaque_imports: bool) -> FieldType:
        if name in SCALARS:
            return FieldType("scalar", name)
        for candidate in _candidates(name, scope.full_name):
            if candidate in self.messages:
                return FieldType("message", candidate)
            if candidate in self.enums:
                return FieldType("enum", candidate)
        if opaque_imports:
            return FieldType("message", name.lstrip("."), resolved=False)
        raise InvalidSchemaError(
            f"invalid Protobuf {_what(scope)}: {scope.full_name} uses type {name!r}, which neither the "
            "schema nor its imports define"
        )


def _candidates(name: str, scope: str) -> list[str]:
    if name.startswith("."):
        return [name[1:]]
    parts = scope.split(".")
    return [".".join([*parts[:end], name]) for end in range(len(parts), -1, -1)]


def _what(message: ProtoMessage) -> str:
    return f"referenced schema {message.source.name!r}" if message.source.name else "schema"


def _label(element: ast.Field) -> str | None:
    return None if element.cardinality is None else element.cardinality.value.lower()
