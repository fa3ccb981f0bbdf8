"""A JSON Schema document loaded into the typed nodes the compatibility rules compare.

Confluent's rules are defined over the schema model of its Java validator, not over raw JSON, so
the loader reproduces how that model reads a schema: ``type: [a, b]`` is an ``anyOf`` of one
node per type; an object whose keywords belong to several families (say ``enum`` next to
``type``) becomes an ``allOf`` of one node per family; a node with ``$ref`` is only the
reference (its sibling keywords are ignored); keywords of a family without a ``type`` still
make a node of that family. ``$ref``\\ s are resolved through ``referencing``, so local pointers,
``$id``\\ s and the registry's references all work, recursive schemas included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from referencing import Specification
from referencing.exceptions import Unresolvable

from ..errors import InvalidSchemaError

if TYPE_CHECKING:
    # referencing exports its resolver class only from its private module.
    from referencing._core import Resolver

__all__ = [
    "ArraySchema",
    "BooleanSchema",
    "CombinedSchema",
    "ConditionalSchema",
    "ConstSchema",
    "EmptySchema",
    "EnumSchema",
    "FalseSchema",
    "NotSchema",
    "NullSchema",
    "NumberSchema",
    "ObjectSchema",
    "RefSchema",
    "Schema",
    "StringSchema",
    "deref",
    "load",
]

_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
_OBJECT_KEYWORDS = (
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "patternProperties",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
)
_ARRAY_KEYWORDS = (
    "items",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
)
_FAMILY_KEYWORDS = {
    "array": _ARRAY_KEYWORDS,
    "object": _OBJECT_KEYWORDS,
    "number": _NUMBER_KEYWORDS,
    "string": _STRING_KEYWORDS,
}


@dataclass(eq=False)
class Schema:
    # The JSON this node was read from: two subschemas of a combination that read the same
    # JSON into the same kind of node are one alternative, not two.
    raw: Any
    has_default: bool = False
    # Numeric bounds by keyword (minLength, maximum, maxItems, ...), for every kind that has some.
    limits: dict[str, float] = field(default_factory=dict)

    def identity(self) -> str:
        return type(self).__name__ + json.dumps(self.raw, sort_keys=True)


class EmptySchema(Schema):
    """``{}`` or ``true``: anything goes."""


class FalseSchema(Schema):
    """``false``: nothing goes."""


class BooleanSchema(Schema):
    pass


class NullSchema(Schema):
    pass


class ConditionalSchema(Schema):
    """``if``/``then``/``else``, which the rules do not look into."""


@dataclass(eq=False)
class StringSchema(Schema):
    pattern: str | None = None


@dataclass(eq=False)
class NumberSchema(Schema):
    multiple_of: float | None = None
    integer: bool = False


@dataclass(eq=False)
class EnumSchema(Schema):
    # Values as canonical JSON, so that lists and objects compare and 1 differs from true.
    values: frozenset[str] = frozenset()


@dataclass(eq=False)
class ConstSchema(Schema):
    value: str = ""


@dataclass(eq=False)
class CombinedSchema(Schema):
    criterion: str = "allOf"  # "allOf" | "anyOf" | "oneOf"
    subschemas: list[Schema] = field(default_factory=list)


@dataclass(eq=False)
class NotSchema(Schema):
    negated: Schema | None = None


@dataclass(eq=False)
class ObjectSchema(Schema):
    properties: dict[str, Schema] = field(default_factory=dict)
    pattern_properties: list[tuple[re.Pattern[str], Schema]] = field(default_factory=list)
    required: frozenset[str] = frozenset()
    # ``additionalProperties``: True (absent or true), False, or the schema extra properties follow.
    additional: bool | Schema = True
    unevaluated: Schema | None = None
    property_dependencies: dict[str, frozenset[str]] = field(default_factory=dict)
    schema_dependencies: dict[str, Schema] = field(default_factory=dict)


@dataclass(eq=False)
class ArraySchema(Schema):
    all_items: Schema | None = None
    item_list: list[Schema] = field(default_factory=list)
    additional: bool | Schema = True
    unevaluated: Schema | None = None
    unique_items: bool = False


@dataclass(eq=False)
class RefSchema(Schema):
    ref: str = ""
    target: Schema | None = None


def load(document: Any, resolver: Resolver[Any], specification: Specification[Any]) -> Schema:
    """The node tree of ``document``; raises InvalidSchemaError for a ``$ref`` that does not resolve."""
    return _Loader(specification).load_document(document, resolver)


def deref(schema: Schema) -> Schema:
    while isinstance(schema, RefSchema):
        assert schema.target is not None, "references are linked when the document is loaded"
        schema = schema.target
    return schema


class _Loader:
    def __init__(self, specification: Specification[Any]) -> None:
        self._specification = specification
        # Keyed by the identity of the JSON value, so a subschema reached both directly and
        # through a $ref is one node, and a recursive $ref closes the loop instead of recursing.
        self._nodes: dict[int, Schema] = {}
        self._pending: list[tuple[RefSchema, Any, Resolver[Any]]] = []

    def load_document(self, document: Any, resolver: Resolver[Any]) -> Schema:
        root = self._node(document, resolver)
        # References are linked after the tree is built: the target may be an ancestor.
        while self._pending:
            ref, contents, target_resolver = self._pending.pop()
            ref.target = self._node(contents, target_resolver)
        for node in self._nodes.values():
            if isinstance(node, RefSchema):
                _check_not_a_ref_loop(node)
        return root

    def _node(self, value: Any, resolver: Resolver[Any]) -> Schema:
        node = self._nodes.get(id(value))
        if node is None:
            node = self._build(value, resolver)
            self._nodes[id(value)] = node
        return node

    def _build(self, value: Any, resolver: Resolver[Any]) -> Schema:
        if value is True:
            return EmptySchema(value)
        if value is False:
            return FalseSchema(value)
        if not isinstance(value, dict):
            raise InvalidSchemaError(
                f"invalid JSON schema: a subschema must be an object or a boolean, not {value!r}"
            )
        resource = self._specification.create_resource(value)
        if resource.id() is not None:
            # A subschema with its own $id is the base its relative $refs resolve against.
            resolver = resolver.in_subresource(resource)
        if "$ref" in value:
            return self._reference(value, resolver)
        parts = self._parts(value, resolver)
        node: Schema
        if not parts:
            node = EmptySchema(value)
        elif len(parts) == 1:
            node = parts[0]
        else:
            node = CombinedSchema(value, criterion="allOf", subschemas=parts)
        node.has_default = "default" in value
        return node

    def _reference(self, value: dict[str, Any], resolver: Resolver[Any]) -> RefSchema:
        ref = value["$ref"]
        try:
            resolved = resolver.lookup(ref)
        except Unresolvable:
            raise InvalidSchemaError(
                f"invalid JSON schema: $ref {ref!r} does not resolve: it is neither a location in the "
                "schema nor one of its references"
            ) from None
        node = RefSchema(value, ref=ref)
        self._pending.append((node, resolved.contents, resolved.resolver))
        return node

    def _parts(self, value: dict[str, Any], resolver: Resolver[Any]) -> list[Schema]:
        child = self._child_loader(resolver)
        parts: list[Schema] = []
        if "enum" in value:
            parts.append(EnumSchema(value, values=frozenset(_canonical(v) for v in value["enum"])))
        for criterion in ("allOf", "anyOf", "oneOf"):
            if criterion in value:
                subschemas = [child(s) for s in value[criterion]]
                parts.append(CombinedSchema(value, criterion=criterion, subschemas=subschemas))
        if "not" in value:
            parts.append(NotSchema(value, negated=child(value["not"])))
        if "const" in value:
            parts.append(ConstSchema(value, value=_canonical(value["const"])))
        typed: set[str] = set()
        if "type" in value:
            names = value["type"] if isinstance(value["type"], list) else [value["type"]]
            typed = {"number" if name == "integer" else name for name in names}
            nodes = [self._typed(name, value, child) for name in names]
            parts.append(
                CombinedSchema(value, criterion="anyOf", subschemas=nodes) if len(nodes) > 1 else nodes[0]
            )
        for family, keywords in _FAMILY_KEYWORDS.items():
            if family not in typed and any(keyword in value for keyword in keywords):
                parts.append(self._typed(family, value, child))
        if any(keyword in value for keyword in ("if", "then", "else")):
            parts.append(ConditionalSchema(value))
        return parts

    def _child_loader(self, resolver: Resolver[Any]) -> Callable[[Any], Schema]:
        return lambda value: self._node(value, resolver)

    def _typed(self, name: str, value: dict[str, Any], child: Callable[[Any], Schema]) -> Schema:
        limits = _limits(value)
        if name == "string":
            return StringSchema(value, limits=limits, pattern=value.get("pattern"))
        if name in ("number", "integer"):
            return NumberSchema(
                value, limits=limits, multiple_of=value.get("multipleOf"), integer=name == "integer"
            )
        if name == "object":
            return _object(value, limits, child)
        if name == "array":
            return _array(value, limits, child)
        return BooleanSchema(value) if name == "boolean" else NullSchema(value)


def _object(value: dict[str, Any], limits: dict[str, float], child: Callable[[Any], Schema]) -> ObjectSchema:
    dependencies = {**value.get("dependencies", {}), **value.get("dependentRequired", {})}
    dependencies.update(value.get("dependentSchemas", {}))
    return ObjectSchema(
        value,
        limits=limits,
        properties={name: child(s) for name, s in value.get("properties", {}).items()},
        pattern_properties=[
            (re.compile(pattern), child(s)) for pattern, s in value.get("patternProperties", {}).items()
        ],
        required=frozenset(value.get("required", ())),
        additional=_boolean_or_schema(value.get("additionalProperties", True), child),
        unevaluated=child(value["unevaluatedProperties"]) if "unevaluatedProperties" in value else None,
        property_dependencies={k: frozenset(v) for k, v in dependencies.items() if isinstance(v, list)},
        schema_dependencies={k: child(v) for k, v in dependencies.items() if not isinstance(v, list)},
    )


def _array(value: dict[str, Any], limits: dict[str, float], child: Callable[[Any], Schema]) -> ArraySchema:
    items = value.get("items")
    # Draft 2020-12 spells a tuple ``prefixItems`` + ``items``; earlier drafts ``items: [...]`` +
    # ``additionalItems``. Both are the same model: a list of positions and what follows them.
    if "prefixItems" in value:
        item_list, rest, all_items = value["prefixItems"], value.get("items", True), None
    elif isinstance(items, list):
        item_list, rest, all_items = items, value.get("additionalItems", True), None
    elif isinstance(items, bool):
        # A boolean for every item says what an empty tuple's additional items say.
        item_list, rest, all_items = [], items, None
    else:
        item_list, rest, all_items = [], value.get("additionalItems", True), items
    return ArraySchema(
        value,
        limits=limits,
        all_items=None if all_items is None else child(all_items),
        item_list=[child(s) for s in item_list],
        additional=_boolean_or_schema(rest, child),
        unevaluated=child(value["unevaluatedItems"]) if "unevaluatedItems" in value else None,
        unique_items=value.get("uniqueItems") is True,
    )


def _boolean_or_schema(value: Any, child: Callable[[Any], Schema]) -> bool | Schema:
    return value if isinstance(value, bool) else child(value)


_LIMIT_KEYWORDS = (
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minProperties",
    "maxProperties",
    "minItems",
    "maxItems",
    "minContains",
    "maxContains",
)


def _limits(value: Mapping[str, Any]) -> dict[str, float]:
    # Draft 4's boolean exclusiveMinimum/exclusiveMaximum only qualify minimum/maximum.
    return {
        keyword: value[keyword]
        for keyword in _LIMIT_KEYWORDS
        if isinstance(value.get(keyword), int | float) and not isinstance(value[keyword], bool)
    }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_not_a_ref_loop(ref: RefSchema) -> None:
    seen: set[int] = set()
    node: Schema | None = ref
    while isinstance(node, RefSchema):
        if id(node) in seen:
            raise InvalidSchemaError(f"invalid JSON schema: $ref {ref.ref!r} only refers to itself")
        seen.add(id(node))
        node = node.target
