"""Can data valid under one JSON Schema be read with another? Confluent's rules.

Confluent compares the old schema (the writer) with the new one (the reader) node by node and
calls a change compatible when it only relaxes what the reader accepts. Two choices of
Confluent's decide the character of the check and are kept: a content model is *open* when
``additionalProperties`` (or ``additionalItems``) is absent, so adding a property to an open
model is incompatible (old data may carry that property with any value); and a property added
to a *closed* model (``additionalProperties: false``) is compatible unless it is required
without a default. Recursive schemas terminate: a pair of nodes being compared is assumed
compatible when it is met again further down.
"""

from __future__ import annotations

from decimal import Decimal

from ._json_differences import Difference
from ._json_model import (
    ArraySchema,
    CombinedSchema,
    ConstSchema,
    EmptySchema,
    EnumSchema,
    FalseSchema,
    NotSchema,
    NumberSchema,
    ObjectSchema,
    Schema,
    StringSchema,
    deref,
)

__all__ = ["check"]

_LOWER_BOUNDS = ("minLength", "minimum", "exclusiveMinimum", "minProperties", "minItems", "minContains")
_UPPER_BOUNDS = ("maxLength", "maximum", "exclusiveMaximum", "maxProperties", "maxItems", "maxContains")


def check(reader: Schema, writer: Schema) -> list[Difference]:
    """Every reason ``reader`` cannot read what ``writer`` validated; empty when it can."""
    return _Checker().compare(writer, reader, "")


def _kind_prefix(keyword: str) -> str:
    # maxLength -> MAX_LENGTH, exclusiveMinimum -> EXCLUSIVE_MINIMUM
    return "".join(f"_{c}" if c.isupper() else c.upper() for c in keyword)


def _same_kind(a: Schema, b: Schema) -> bool:
    return type(a) is type(b)


class _Checker:
    def __init__(self) -> None:
        self._in_progress: set[tuple[int, int]] = set()

    def compare(self, old: Schema | None, new: Schema | None, path: str) -> list[Difference]:
        if old is None:
            return [] if new is None else [Difference("SCHEMA_ADDED", path)]
        if new is None:
            return []
        old, new = deref(old), deref(new)
        pair = (id(old), id(new))
        if pair in self._in_progress:
            return []
        self._in_progress.add(pair)
        try:
            return self._compare_kinds(old, new, path)
        finally:
            self._in_progress.discard(pair)

    def _compare_kinds(self, old: Schema, new: Schema, path: str) -> list[Difference]:
        if self._covered_by_combination(old, new, path):
            return []
        if not _same_kind(old, new):
            if isinstance(old, FalseSchema) or isinstance(new, EmptySchema) or _both_connect_bytes(old, new):
                return []
            return [Difference("TYPE_CHANGED", path)]
        if isinstance(old, StringSchema) and isinstance(new, StringSchema):
            return _limits(old, new, path) + _pattern(old, new, path)
        if isinstance(old, NumberSchema) and isinstance(new, NumberSchema):
            return _limits(old, new, path) + _number(old, new, path)
        if isinstance(old, EnumSchema) and isinstance(new, EnumSchema):
            return _enum(old, new, path)
        if isinstance(old, ConstSchema) and isinstance(new, ConstSchema):
            return [] if old.value == new.value else [Difference("ENUM_ARRAY_CHANGED", f"{path}/const")]
        if isinstance(old, CombinedSchema) and isinstance(new, CombinedSchema):
            return self._combined(old, new, path)
        if isinstance(old, NotSchema) and isinstance(new, NotSchema):
            # What the reader must not match may only shrink: compare the negations reversed.
            broken = self.compare(new.negated, old.negated, f"{path}/not")
            return [Difference("NOT_TYPE_EXTENDED", f"{path}/not")] if broken else []
        if isinstance(old, ObjectSchema) and isinstance(new, ObjectSchema):
            return self._object(old, new, path)
        if isinstance(old, ArraySchema) and isinstance(new, ArraySchema):
            return self._array(old, new, path)
        return []

    def _covered_by_combination(self, old: Schema, new: Schema, path: str) -> bool:
        """A plain node against a combination: fine when one alternative covers it."""
        if isinstance(new, CombinedSchema) and not isinstance(old, CombinedSchema):
            # The reader may pick any alternative of a union, and the only one of a singleton.
            alternatives = len(new.subschemas) == 1 or new.criterion != "allOf"
            return alternatives and any(not self.compare(old, sub, path) for sub in new.subschemas)
        if isinstance(old, CombinedSchema) and not isinstance(new, CombinedSchema):
            # Data valid under every part of the writer's allOf is valid under each one of them.
            conjunction = len(old.subschemas) == 1 or old.criterion == "allOf"
            return conjunction and any(not self.compare(sub, new, path) for sub in old.subschemas)
        return False

    def _combined(self, old: CombinedSchema, new: CombinedSchema, path: str) -> list[Difference]:
        if not _criterion_relaxed(old, new):
            return [Difference("COMBINED_TYPE_CHANGED", path)]
        olds = list({s.identity(): s for s in old.subschemas}.values())
        news = list({s.identity(): s for s in new.subschemas}.values())
        differences = []
        if len(olds) < len(news) and new.criterion == "allOf":
            differences.append(Difference("PRODUCT_TYPE_EXTENDED", path))
        elif len(olds) > len(news) and old.criterion != "allOf":
            differences.append(Difference("SUM_TYPE_NARROWED", path))
        compatible = [
            {j for j, n in enumerate(news) if not self.compare(o, n, f"{path}/{old.criterion}/{i}")}
            for i, o in enumerate(olds)
        ]
        if _maximum_matching(compatible) < min(len(olds), len(news)):
            differences.append(Difference("COMBINED_TYPE_SUBSCHEMAS_CHANGED", path))
        return differences

    def _object(self, old: ObjectSchema, new: ObjectSchema, path: str) -> list[Difference]:
        differences = [
            Difference("REQUIRED_ATTRIBUTE_ADDED", f"{path}/required/{name}")
            for name in old.properties
            if name in new.properties
            and name in new.required
            and name not in old.required
            and not new.properties[name].has_default
        ]
        for name in sorted(old.properties.keys() | new.properties.keys()):
            differences += self._property(old, new, name, f"{path}/properties/{name}")
        differences += self._dependencies(old, new, f"{path}/dependencies")
        differences += self._additional(
            old.additional, new.additional, f"{path}/additionalProperties", "ADDITIONAL_PROPERTIES"
        )
        differences += self._unevaluated(
            old.unevaluated, new.unevaluated, f"{path}/unevaluatedProperties", "UNEVALUATED_PROPERTIES"
        )
        return differences + _limits(old, new, path)

    def _property(self, old: ObjectSchema, new: ObjectSchema, name: str, path: str) -> list[Difference]:
        old_schema, new_schema = old.properties.get(name), new.properties.get(name)
        if old_schema is not None and new_schema is not None:
            return self.compare(old_schema, new_schema, path)
        if new_schema is None:
            assert old_schema is not None
            if _open(new):
                return []
            covering = _covering_property_schema(new, name)
            if covering is not None:
                return self._covered(
                    old_schema, covering, path, "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN"
                )
            if isinstance(deref(old_schema), FalseSchema):
                return []
            return [Difference("PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL", path)]
        required_without_default = name in new.required and not new_schema.has_default
        if _open(old):
            if isinstance(deref(new_schema), EmptySchema):
                return []
            if required_without_default:
                return [Difference("REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", path)]
            if name in new.required:
                return [Difference("REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_OPEN_CONTENT_MODEL", path)]
            return [Difference("OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", path)]
        differences = []
        covering = _covering_property_schema(old, name)
        if covering is not None:
            differences = self._covered(
                covering, new_schema, path, "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN"
            )
        if required_without_default:
            differences.append(Difference("REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", path))
        return differences

    def _covered(self, old: Schema, new: Schema, path: str, kind: str) -> list[Difference]:
        differences = self.compare(old, new, path)
        return [*differences, Difference(f"{kind}_CONTENT_MODEL", path)] if differences else []

    def _dependencies(self, old: ObjectSchema, new: ObjectSchema, path: str) -> list[Difference]:
        differences = []
        for name in sorted(old.property_dependencies.keys() | new.property_dependencies.keys()):
            before, after = old.property_dependencies.get(name), new.property_dependencies.get(name)
            if after is None or before == after or (before is not None and after <= before):
                continue
            if before is None:
                kind = "DEPENDENCY_ARRAY_ADDED"
            else:
                kind = "DEPENDENCY_ARRAY_EXTENDED" if after >= before else "DEPENDENCY_ARRAY_CHANGED"
            differences.append(Difference(kind, f"{path}/{name}"))
        for name in sorted(old.schema_dependencies.keys() | new.schema_dependencies.keys()):
            if name in new.schema_dependencies:
                if name not in old.schema_dependencies:
                    differences.append(Difference("DEPENDENCY_SCHEMA_ADDED", f"{path}/{name}"))
                else:
                    differences += self.compare(
                        old.schema_dependencies[name], new.schema_dependencies[name], f"{path}/{name}"
                    )
        return differences

    def _additional(self, old: bool | Schema, new: bool | Schema, path: str, prefix: str) -> list[Difference]:
        if (old is not False) != (new is not False):
            return [Difference(f"{prefix}_REMOVED", path)] if new is False else []
        if isinstance(new, Schema) and not isinstance(old, Schema):
            return [Difference(f"{prefix}_NARROWED", path)]
        if isinstance(old, Schema) and isinstance(new, Schema):
            return self.compare(old, new, path)
        return []

    def _unevaluated(
        self, old: Schema | None, new: Schema | None, path: str, prefix: str
    ) -> list[Difference]:
        if new is None:
            return []
        new = deref(new)
        if isinstance(new, FalseSchema):
            return (
                []
                if old is not None and isinstance(deref(old), FalseSchema)
                else [Difference(f"{prefix}_REMOVED", path)]
            )
        if old is None:
            return [Difference(f"{prefix}_NARROWED", path)]
        old = deref(old)
        if isinstance(old, FalseSchema) or isinstance(new, EmptySchema):
            return []
        if isinstance(old, EmptySchema):
            return [Difference(f"{prefix}_NARROWED", path)]
        return self.compare(old, new, path)

    def _array(self, old: ArraySchema, new: ArraySchema, path: str) -> list[Difference]:
        differences = self.compare(old.all_items, new.all_items, f"{path}/items")
        for index in range(max(len(old.item_list), len(new.item_list))):
            differences += self._item(old, new, index, f"{path}/items/{index}")
        differences += self._additional(
            old.additional, new.additional, f"{path}/additionalItems", "ADDITIONAL_ITEMS"
        )
        differences += self._unevaluated(
            old.unevaluated, new.unevaluated, f"{path}/unevaluatedItems", "UNEVALUATED_ITEMS"
        )
        if new.unique_items and not old.unique_items:
            differences.append(Difference("UNIQUE_ITEMS_ADDED", f"{path}/uniqueItems"))
        return differences + _limits(old, new, path)

    def _item(self, old: ArraySchema, new: ArraySchema, index: int, path: str) -> list[Difference]:
        if index < len(old.item_list) and index < len(new.item_list):
            return self.compare(old.item_list[index], new.item_list[index], path)
        if index < len(old.item_list):
            removed = old.item_list[index]
            if _open(new):
                return []
            covering = _covering_item_schema(new)
            if covering is not None:
                return self._covered(removed, covering, path, "ITEM_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN")
            if isinstance(deref(removed), FalseSchema):
                return []
            return [Difference("ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL", path)]
        added = new.item_list[index]
        if _open(old):
            return (
                []
                if isinstance(deref(added), EmptySchema)
                else [Difference("ITEM_ADDED_TO_OPEN_CONTENT_MODEL", path)]
            )
        covering = _covering_item_schema(old)
        if covering is not None:
            return self._covered(covering, added, path, "ITEM_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN")
        return []


def _criterion_relaxed(old: CombinedSchema, new: CombinedSchema) -> bool:
    old_single, new_single = len(old.subschemas) == 1, len(new.subschemas) == 1
    return (
        old.criterion == new.criterion
        or new.criterion == "anyOf"
        or (old_single and new_single)
        or (old_single and new.criterion == "oneOf")
        or (new_single and old.criterion == "allOf")
    )


def _maximum_matching(compatible: list[set[int]]) -> int:
    """The size of a maximum matching in a bipartite graph (augmenting paths)."""
    match_of: dict[int, int] = {}

    def augment(left: int, visited: set[int]) -> bool:
        for right in compatible[left]:
            if right not in visited:
                visited.add(right)
                if right not in match_of or augment(match_of[right], visited):
                    match_of[right] = left
                    return True
        return False

    return sum(augment(left, set()) for left in range(len(compatible)))


def _open(schema: ObjectSchema | ArraySchema) -> bool:
    if schema.additional is not True:
        return False
    if isinstance(schema, ObjectSchema) and schema.pattern_properties:
        return False
    return schema.unevaluated is None or isinstance(deref(schema.unevaluated), EmptySchema)


def _covering_property_schema(schema: ObjectSchema, name: str) -> Schema | None:
    """What a property the schema does not declare must match, for a partially open model."""
    for pattern, pattern_schema in schema.pattern_properties:
        if pattern.search(name):
            return pattern_schema
    return _covering_item_schema(schema)


def _covering_item_schema(schema: ObjectSchema | ArraySchema) -> Schema | None:
    if isinstance(schema.additional, Schema):
        return schema.additional
    if schema.additional is True and schema.unevaluated is not None:
        unevaluated = deref(schema.unevaluated)
        if not isinstance(unevaluated, FalseSchema | EmptySchema):
            return unevaluated
    return None


def _limits(old: Schema, new: Schema, path: str) -> list[Difference]:
    differences = []
    for keyword in _LOWER_BOUNDS + _UPPER_BOUNDS:
        before, after = old.limits.get(keyword), new.limits.get(keyword)
        if after is None or before == after:
            continue
        prefix = _kind_prefix(keyword)
        if before is None:
            differences.append(Difference(f"{prefix}_ADDED", f"{path}/{keyword}"))
        elif keyword in _LOWER_BOUNDS and after > before:
            differences.append(Difference(f"{prefix}_INCREASED", f"{path}/{keyword}"))
        elif keyword in _UPPER_BOUNDS and after < before:
            differences.append(Difference(f"{prefix}_DECREASED", f"{path}/{keyword}"))
    return differences


def _pattern(old: StringSchema, new: StringSchema, path: str) -> list[Difference]:
    if new.pattern is None or new.pattern == old.pattern:
        return []
    return [Difference("PATTERN_ADDED" if old.pattern is None else "PATTERN_CHANGED", f"{path}/pattern")]


def _number(old: NumberSchema, new: NumberSchema, path: str) -> list[Difference]:
    differences = []
    if new.multiple_of is not None:
        if old.multiple_of is None:
            differences.append(Difference("MULTIPLE_OF_ADDED", f"{path}/multipleOf"))
        else:
            # Decimal, so that 0.3 is seen as a multiple of 0.1.
            before, after = Decimal(str(old.multiple_of)), Decimal(str(new.multiple_of))
            if after % before == 0 and after != before:
                differences.append(Difference("MULTIPLE_OF_EXPANDED", f"{path}/multipleOf"))
            elif before % after != 0:
                differences.append(Difference("MULTIPLE_OF_CHANGED", f"{path}/multipleOf"))
    if new.integer and not old.integer:
        differences.append(Difference("TYPE_NARROWED", path))
    return differences


def _enum(old: EnumSchema, new: EnumSchema, path: str) -> list[Difference]:
    if new.values >= old.values:
        return []
    kind = "ENUM_ARRAY_NARROWED" if new.values <= old.values else "ENUM_ARRAY_CHANGED"
    return [Difference(kind, f"{path}/enum")]


def _both_connect_bytes(old: Schema, new: Schema) -> bool:
    # Kafka Connect marks its bytes fields; the JSON converter changed how decimals map to them,
    # and Confluent lets either form read the other.
    return all(isinstance(s.raw, dict) and s.raw.get("connect.type") == "bytes" for s in (old, new))
