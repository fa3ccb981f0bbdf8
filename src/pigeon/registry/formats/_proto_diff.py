"""Can data written with one Protobuf schema be read with another? Confluent's rules.

Fields are matched by number, across oneofs. What breaks a reader, and nothing else, is
reported, under Confluent's names: a changed package, a removed message, a field whose kind
(scalar, message, map) or wire-level scalar type changed, a numeric field that became repeated
or stopped being, a required field added or removed (proto2), a oneof member removed, and
independent fields merged into one oneof. Renames, added or removed optional fields, enum
changes and moved messages are compatible, as in Confluent. A change of ``syntax`` alone is not
a rule of Confluent's either: proto2 and proto3 share the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._proto_model import FieldType, ProtoField, ProtoMessage, ProtoSchema

__all__ = ["Difference", "check"]

# Scalars whose encodings read as one another, as Protobuf's language guide groups them.
_SCALAR_GROUPS = {
    "int32": "varint",
    "int64": "varint",
    "uint32": "varint",
    "uint64": "varint",
    "bool": "varint",
    "sint32": "zigzag",
    "sint64": "zigzag",
    "string": "length-delimited",
    "bytes": "length-delimited",
    "fixed32": "fixed32",
    "sfixed32": "fixed32",
    "fixed64": "fixed64",
    "sfixed64": "fixed64",
    "float": "float",
    "double": "double",
}


@dataclass(frozen=True)
class Difference:
    kind: str
    path: tuple[str, ...]  # message names, then oneof name and field number, as Confluent's "#/A/B/3"
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at #/{'/'.join(self.path)}: {self.detail}"


def check(reader: ProtoSchema, writer: ProtoSchema) -> list[Difference]:
    """Every reason ``reader`` cannot read what ``writer`` wrote; empty when it can."""
    return _Checker(writer, reader).run()


class _Checker:
    def __init__(self, old: ProtoSchema, new: ProtoSchema) -> None:
        self._old, self._new = old, new
        self._in_progress: set[int] = set()

    def run(self) -> list[Difference]:
        differences = []
        if self._old.package != self._new.package:
            detail = (
                f"the writer schema's package is {self._old.package!r}, the reader's {self._new.package!r}"
            )
            differences.append(Difference("PACKAGE_CHANGED", (), detail))
        return differences + self._messages(self._old.messages, self._new.messages, ())

    def _messages(
        self, old: dict[str, ProtoMessage], new: dict[str, ProtoMessage], path: tuple[str, ...]
    ) -> list[Difference]:
        differences = []
        for name, message in old.items():
            if name not in new:
                detail = f"the reader schema has no message {message.full_name}"
                differences.append(Difference("MESSAGE_REMOVED", (*path, name), detail))
            else:
                differences += self._message(message, new[name], (*path, name))
        return differences

    def _message(self, old: ProtoMessage, new: ProtoMessage, path: tuple[str, ...]) -> list[Difference]:
        # A recursive message type is compared once.
        if id(old) in self._in_progress:
            return []
        self._in_progress.add(id(old))
        try:
            differences = _oneof_merges(old, new, path)
            for number in sorted(old.fields.keys() | new.fields.keys()):
                differences += self._field_pair(old, new, number, path)
            return differences + self._messages(old.messages, new.messages, path)
        finally:
            self._in_progress.discard(id(old))

    def _field_pair(
        self, old: ProtoMessage, new: ProtoMessage, number: int, path: tuple[str, ...]
    ) -> list[Difference]:
        before, after = old.fields.get(number), new.fields.get(number)
        if after is None:
            assert before is not None
            if before.oneof is not None:
                # Deleting a whole oneof is fine; dropping some of its members loses data.
                if before.oneof in new.oneofs or any(n in new.fields for n in old.oneofs[before.oneof]):
                    detail = f"the reader schema lacks field {before.name!r} of oneof {before.oneof!r}"
                    return [Difference("ONEOF_FIELD_REMOVED", (*path, before.oneof, str(number)), detail)]
            elif before.label == "required":
                detail = f"the writer schema requires field {before.name!r}, which the reader schema lacks"
                return [Difference("REQUIRED_FIELD_REMOVED", (*path, str(number)), detail)]
            return []
        if before is None:
            if after.oneof is None and after.label == "required":
                detail = f"the reader schema requires field {after.name!r}, which the writer schema lacks"
                return [Difference("REQUIRED_FIELD_ADDED", (*path, str(number)), detail)]
            return []
        where = (*path, *((after.oneof,) if after.oneof else ()), str(number))
        return self._field(before, after, where)

    def _field(self, old: ProtoField, new: ProtoField, path: tuple[str, ...]) -> list[Difference]:
        return self._types(old.label, new.label, old.type, new.type, path, repr(new.name))

    def _types(
        self,
        old_label: str | None,
        new_label: str | None,
        old: FieldType,
        new: FieldType,
        path: tuple[str, ...],
        field: str,
    ) -> list[Difference]:
        old_kind, new_kind = _kind(old), _kind(new)
        if old_kind != new_kind:
            detail = (
                f"field {field} is a {old_kind} in the writer schema but a {new_kind} in the reader schema"
            )
            return [Difference("FIELD_KIND_CHANGED", path, detail)]
        if old.key is not None and new.key is not None and old.value is not None and new.value is not None:
            return self._types(None, None, old.key, new.key, path, f"{field} (map key)") + self._types(
                None, None, old.value, new.value, path, f"{field} (map value)"
            )
        if old_kind == "message":
            return self._message_types(old, new, path, field)
        old_group, new_group = _scalar_group(old), _scalar_group(new)
        if old_group != new_group:
            detail = (
                f"field {field} changed from {old.name} to {new.name}, which do not share a wire encoding"
            )
            return [Difference("FIELD_SCALAR_KIND_CHANGED", path, detail)]
        # Packed repeated numbers and single ones are encoded differently; strings are not.
        if old_label and new_label and old_label != new_label and old_group != "length-delimited":
            detail = (
                f"numeric field {field} is {old_label} in the writer schema but {new_label} in the reader's"
            )
            return [Difference("FIELD_NUMERIC_LABEL_CHANGED", path, detail)]
        return []

    def _message_types(
        self, old: FieldType, new: FieldType, path: tuple[str, ...], field: str
    ) -> list[Difference]:
        renamed = Difference(
            "FIELD_NAMED_TYPE_CHANGED", path, f"field {field} changed from message {old.name} to {new.name}"
        )
        if not (old.resolved and new.resolved):
            return [] if old.name == new.name else [renamed]
        old_message, new_message = self._old.all_messages[old.name], self._new.all_messages[new.name]
        old_local, new_local = _local_name(old_message), _local_name(new_message)
        if old_local != new_local:
            return [renamed]
        if old_message.source is self._old.source and new_message.source is self._new.source:
            return []  # both in the schemas themselves: the message walk compares them
        if old_message.source == new_message.source:
            return []  # the same referenced file on both sides
        differences = self._message(old_message, new_message, tuple(old_local.split(".")))
        if differences:
            detail = f"field {field} has message type {new.name}, which changed incompatibly"
            differences.append(Difference("FIELD_NAMED_TYPE_CHANGED", path, detail))
        return differences


def _oneof_merges(old: ProtoMessage, new: ProtoMessage, path: tuple[str, ...]) -> list[Difference]:
    """Fields that could all be set together in the writer schema but share a oneof in the reader's."""
    old_oneof_of = {number: name for name, numbers in old.oneofs.items() for number in numbers}
    differences = []
    for name, numbers in new.oneofs.items():
        # Each writer oneof is one group, each writer top-level field its own; new fields don't count.
        origins = {old_oneof_of.get(n, n) for n in numbers if n in old.fields}
        moved_in = sum(1 for n in numbers if n in old.fields and n not in old_oneof_of)
        if len(origins) > 1:
            if moved_in > 1:
                detail = (
                    f"fields that are independent in the writer schema share oneof {name!r} in the reader's"
                )
                differences.append(Difference("MULTIPLE_FIELDS_MOVED_TO_ONEOF", (*path, name), detail))
            else:
                detail = f"a field outside oneof {name!r} in the writer schema is inside it in the reader's"
                differences.append(Difference("FIELD_MOVED_TO_EXISTING_ONEOF", (*path, name), detail))
    return differences


def _kind(field_type: FieldType) -> str:
    # Enums are numbers on the wire: Confluent counts them as scalars.
    return "scalar" if field_type.kind == "enum" else field_type.kind


def _scalar_group(field_type: FieldType) -> str:
    return "varint" if field_type.kind == "enum" else _SCALAR_GROUPS[field_type.name]


def _local_name(message: ProtoMessage) -> str:
    return message.full_name.removeprefix(f"{message.package}.") if message.package else message.full_name
