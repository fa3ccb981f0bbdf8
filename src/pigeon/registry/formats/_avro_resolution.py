"""Can data written with one Avro schema be read with another? The specification's resolution rules.

Problems carry the kinds Avro's own checkers report (``TYPE_MISMATCH``, ``NAME_MISMATCH``, ...), a
location in the reader schema as a path (``/fields/1/type``) and the detail, so a user can find
the offending spot. Recursive schemas terminate: a pair of schemas being compared is assumed
compatible when it is met again further down.
"""

from __future__ import annotations

from dataclasses import dataclass

from avro.schema import (
    ArraySchema,
    EnumSchema,
    Field,
    FixedSchema,
    MapSchema,
    NamedSchema,
    RecordSchema,
    Schema,
    UnionSchema,
)

__all__ = ["Problem", "check"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# (reader, writer) pairs the specification lets a reader promote.
_PROMOTIONS = frozenset(
    {
        ("long", "int"),
        ("float", "int"),
        ("float", "long"),
        ("double", "int"),
        ("double", "long"),
        ("double", "float"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)


@dataclass(frozen=True)
class Problem:
    kind: str
    location: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.location}: {self.detail}"


def check(reader: Schema, writer: Schema) -> list[Problem]:
    """Every reason ``reader`` cannot read what ``writer`` wrote; empty when it can."""
    return _Checker().compare(reader, writer, ())


def _kind(schema: Schema) -> str:
    # An error type is a record for resolution purposes.
    return "record" if schema.type == "error" else str(schema.type)


class _Checker:
    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], list[Problem] | None] = {}

    def compare(self, reader: Schema, writer: Schema, path: tuple[str, ...]) -> list[Problem]:
        key = (id(reader), id(writer))
        if key in self._seen:
            return self._seen[key] or []
        self._seen[key] = None
        problems = self._resolve(reader, writer, path)
        self._seen[key] = problems
        return problems

    def _resolve(self, reader: Schema, writer: Schema, path: tuple[str, ...]) -> list[Problem]:
        reader_kind, writer_kind = _kind(reader), _kind(writer)
        if writer_kind == "union":
            assert isinstance(writer, UnionSchema)
            return self._writer_union(reader, writer, path)
        if reader_kind == writer_kind:
            return self._same_kind(reader, writer, path)
        if reader_kind == "union":
            assert isinstance(reader, UnionSchema)
            if any(not self.compare(branch, writer, path) for branch in reader.schemas):
                return []
            return [
                _problem(
                    "MISSING_UNION_BRANCH", path, f"reader union lacking writer type: {writer_kind.upper()}"
                )
            ]
        if (reader_kind, writer_kind) in _PROMOTIONS:
            return []
        detail = f"reader type: {reader_kind} not compatible with writer type: {writer_kind}"
        return [_problem("TYPE_MISMATCH", path, detail)]

    def _writer_union(self, reader: Schema, writer: UnionSchema, path: tuple[str, ...]) -> list[Problem]:
        # Each branch the writer may have chosen must be readable on its own. Between two unions
        # a problem is located at the writer's branch; otherwise the branch's own problem stands.
        problems = []
        for index, branch in enumerate(writer.schemas):
            branch_path = (*path, str(index)) if _kind(reader) == "union" else path
            problems += self.compare(reader, branch, branch_path)
        return problems

    def _same_kind(self, reader: Schema, writer: Schema, path: tuple[str, ...]) -> list[Problem]:
        kind = _kind(reader)
        if kind in _PRIMITIVES:
            return []
        if isinstance(reader, ArraySchema) and isinstance(writer, ArraySchema):
            return self.compare(reader.items, writer.items, (*path, "items"))
        if isinstance(reader, MapSchema) and isinstance(writer, MapSchema):
            return self.compare(reader.values, writer.values, (*path, "values"))
        if isinstance(reader, FixedSchema) and isinstance(writer, FixedSchema):
            problems = _names(reader, writer, path)
            if reader.size != writer.size:
                detail = f"expected: {writer.size}, found: {reader.size}"
                problems.append(_problem("FIXED_SIZE_MISMATCH", (*path, "size"), detail))
            return problems
        if isinstance(reader, EnumSchema) and isinstance(writer, EnumSchema):
            return _names(reader, writer, path) + _enum_symbols(reader, writer, path)
        if isinstance(reader, RecordSchema) and isinstance(writer, RecordSchema):
            return _names(reader, writer, path) + self._fields(reader, writer, path)
        raise AssertionError(f"unexpected Avro schema kind {kind!r}")

    def _fields(self, reader: RecordSchema, writer: RecordSchema, path: tuple[str, ...]) -> list[Problem]:
        problems = []
        for index, field in enumerate(reader.fields):
            written = _written_field(field, writer)
            if written is not None:
                problems += self.compare(field.type, written.type, (*path, "fields", str(index), "type"))
            elif not field.has_default:
                problems.append(
                    _problem("READER_FIELD_MISSING_DEFAULT_VALUE", (*path, "fields", str(index)), field.name)
                )
        return problems


def _written_field(field: Field, writer: RecordSchema) -> Field | None:
    fields = writer.fields_dict
    for name in (field.name, *_list_prop(field, "aliases")):
        if name in fields:
            written: Field = fields[name]
            return written
    return None


def _names(reader: NamedSchema, writer: NamedSchema, path: tuple[str, ...]) -> list[Problem]:
    if reader.name == writer.name or writer.fullname in _aliases(reader):
        return []
    return [_problem("NAME_MISMATCH", (*path, "name"), f"expected: {writer.fullname}")]


def _aliases(schema: NamedSchema) -> set[str]:
    # Aliases without a dot are relative to the named type's own namespace.
    namespace = schema.namespace
    return {
        alias if "." in alias or not namespace else f"{namespace}.{alias}"
        for alias in _list_prop(schema, "aliases")
    }


def _enum_symbols(reader: EnumSchema, writer: EnumSchema, path: tuple[str, ...]) -> list[Problem]:
    missing = set(writer.symbols) - set(reader.symbols)
    # A reader default stands in for any symbol it does not know.
    if not missing or reader.props.get("default") in reader.symbols:
        return []
    detail = "{" + ", ".join(repr(symbol) for symbol in sorted(missing)) + "}"
    return [_problem("MISSING_ENUM_SYMBOLS", (*path, "symbols"), detail)]


def _list_prop(owner: object, name: str) -> list[str]:
    value = getattr(owner, "props", {}).get(name)
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _problem(kind: str, path: tuple[str, ...], detail: str) -> Problem:
    return Problem(kind, "/" + "/".join(path), detail)
