"""A serialized ``FileDescriptorProto`` written back as .proto text.

Confluent's serializers register a Protobuf schema as the base64 of the descriptor of the
message's file, not as .proto text; writing it out as text lets both forms go through one
parser, one model and one canonical form. What a descriptor cannot say (comments, the spelling
of type names) is lost, which is fine: the compatibility rules ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

__all__ = ["proto_text"]

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    _F.TYPE_DOUBLE: "double",
    _F.TYPE_FLOAT: "float",
    _F.TYPE_INT64: "int64",
    _F.TYPE_UINT64: "uint64",
    _F.TYPE_INT32: "int32",
    _F.TYPE_FIXED64: "fixed64",
    _F.TYPE_FIXED32: "fixed32",
    _F.TYPE_BOOL: "bool",
    _F.TYPE_STRING: "string",
    _F.TYPE_BYTES: "bytes",
    _F.TYPE_UINT32: "uint32",
    _F.TYPE_SFIXED32: "sfixed32",
    _F.TYPE_SFIXED64: "sfixed64",
    _F.TYPE_SINT32: "sint32",
    _F.TYPE_SINT64: "sint64",
}
_INDENT = "  "


def proto_text(file: descriptor_pb2.FileDescriptorProto) -> str:
    """The .proto source of ``file``; raises ValueError for what .proto text cannot express."""
    syntax = file.syntax or "proto2"
    if syntax not in ("proto2", "proto3"):
        raise ValueError(f"syntax {syntax!r} is not supported (only proto2 and proto3 are)")
    lines = [f'syntax = "{syntax}";']
    if file.package:
        lines.append(f"package {file.package};")
    for index, dependency in enumerate(file.dependency):
        modifier = "public " if index in file.public_dependency else ""
        modifier = "weak " if index in file.weak_dependency else modifier
        lines.append(f'import {modifier}"{dependency}";')
    lines += [f"option {option};" for option in _options(file.options)]
    for message in file.message_type:
        lines += _message(message, syntax, 0)
    for enum in file.enum_type:
        lines += _enum(enum, 0)
    for service in file.service:
        lines += _service(service)
    return "\n".join(lines) + "\n"


def _message(message: descriptor_pb2.DescriptorProto, syntax: str, depth: int) -> list[str]:
    pad = _INDENT * (depth + 1)
    lines = [f"{_INDENT * depth}message {message.name} {{"]
    lines += [f"{pad}option {option};" for option in _options(message.options, skip=("map_entry",))]
    map_entries = {entry.name: entry for entry in message.nested_type if entry.options.map_entry}
    # A proto3 "optional" field sits in a oneof of its own that the source never spelled.
    real_oneofs = {
        field.oneof_index
        for field in message.field
        if field.HasField("oneof_index") and not field.proto3_optional
    }
    printed_oneofs: set[int] = set()
    for field in message.field:
        if field.HasField("oneof_index") and field.oneof_index in real_oneofs:
            if field.oneof_index not in printed_oneofs:
                printed_oneofs.add(field.oneof_index)
                lines += _oneof(message, field.oneof_index, map_entries, syntax, depth + 1)
            continue
        lines.append(pad + _field(field, map_entries, syntax, in_oneof=False))
    for nested in message.nested_type:
        if nested.name not in map_entries:
            lines += _message(nested, syntax, depth + 1)
    for enum in message.enum_type:
        lines += _enum(enum, depth + 1)
    lines += _reserved(message.reserved_range, message.reserved_name, pad, exclusive_end=True)
    lines.append(f"{_INDENT * depth}}}")
    return lines


def _oneof(
    message: descriptor_pb2.DescriptorProto,
    index: int,
    map_entries: dict[str, descriptor_pb2.DescriptorProto],
    syntax: str,
    depth: int,
) -> list[str]:
    pad = _INDENT * depth
    lines = [f"{pad}oneof {message.oneof_decl[index].name} {{"]
    for field in message.field:
        if field.HasField("oneof_index") and field.oneof_index == index:
            lines.append(pad + _INDENT + _field(field, map_entries, syntax, in_oneof=True))
    lines.append(f"{pad}}}")
    return lines


def _field(
    field: descriptor_pb2.FieldDescriptorProto,
    map_entries: dict[str, descriptor_pb2.DescriptorProto],
    syntax: str,
    in_oneof: bool,
) -> str:
    entry = map_entries.get(field.type_name.rsplit(".", 1)[-1]) if field.type == _F.TYPE_MESSAGE else None
    if entry is not None and field.label == _F.LABEL_REPEATED:
        key, value = entry.field[0], entry.field[1]
        declaration = f"map<{_type(key)}, {_type(value)}> {field.name} = {field.number}"
    else:
        declaration = f"{_label(field, syntax, in_oneof)}{_type(field)} {field.name} = {field.number}"
    options = _options(field.options)
    if field.HasField("default_value"):
        options.insert(0, f"default = {_default(field)}")
    return declaration + (f" [{', '.join(options)}]" if options else "") + ";"


def _label(field: descriptor_pb2.FieldDescriptorProto, syntax: str, in_oneof: bool) -> str:
    if field.label == _F.LABEL_REPEATED:
        return "repeated "
    if field.label == _F.LABEL_REQUIRED:
        return "required "
    if in_oneof or (syntax == "proto3" and not field.proto3_optional):
        return ""
    return "optional "


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    return _SCALARS.get(field.type) or field.type_name


def _default(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type == _F.TYPE_STRING:
        return _quote(field.default_value)
    if field.type == _F.TYPE_BYTES:
        # The descriptor holds a bytes default already C-escaped, as the source spells it.
        return f'"{field.default_value}"'
    return field.default_value


def _enum(enum: descriptor_pb2.EnumDescriptorProto, depth: int) -> list[str]:
    pad = _INDENT * (depth + 1)
    lines = [f"{_INDENT * depth}enum {enum.name} {{"]
    lines += [f"{pad}option {option};" for option in _options(enum.options)]
    for value in enum.value:
        options = _options(value.options)
        suffix = f" [{', '.join(options)}]" if options else ""
        lines.append(f"{pad}{value.name} = {value.number}{suffix};")
    lines += _reserved(enum.reserved_range, enum.reserved_name, pad, exclusive_end=False)
    lines.append(f"{_INDENT * depth}}}")
    return lines


def _service(service: descriptor_pb2.ServiceDescriptorProto) -> list[str]:
    lines = [f"service {service.name} {{"]
    for method in service.method:
        request = f"stream {method.input_type}" if method.client_streaming else method.input_type
        response = f"stream {method.output_type}" if method.server_streaming else method.output_type
        lines.append(f"{_INDENT}rpc {method.name}({request}) returns ({response});")
    lines.append("}")
    return lines


def _reserved(ranges: Iterable[Any], names: Iterable[str], pad: str, exclusive_end: bool) -> list[str]:
    # Message reserved ranges end one past the last number, enum reserved ranges on it.
    spans = []
    for span in ranges:
        end = span.end - 1 if exclusive_end else span.end
        spans.append(str(span.start) if end == span.start else f"{span.start} to {end}")
    lines = [f"{pad}reserved {', '.join(spans)};"] if spans else []
    quoted = [_quote(name) for name in names]
    if quoted:
        lines.append(f"{pad}reserved {', '.join(quoted)};")
    return lines


def _options(options: Message, skip: tuple[str, ...] = ()) -> list[str]:
    """The scalar options set on a descriptor, as ``name = value``; custom options are left out."""
    rendered = []
    for descriptor, value in options.ListFields():
        # Message-valued and repeated options are rare in schemas and left out with the custom ones.
        if descriptor.name in skip or descriptor.is_extension or not isinstance(value, str | int | float):
            continue
        if descriptor.enum_type is not None:
            text = descriptor.enum_type.values_by_number[int(value)].name
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = _quote(value)
        else:
            text = str(value)
        rendered.append(f"{descriptor.name} = {text}")
    return rendered


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
