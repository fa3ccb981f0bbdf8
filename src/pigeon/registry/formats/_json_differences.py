"""The JSON Schema incompatibilities, named as Confluent names them, with what each one means.

Only the kinds that break compatibility exist here: the compatible changes Confluent also
records (a title changed, a bound relaxed, a property added to a closed model) never reach a
user, so the checker does not produce them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Difference"]

_ADDED_CONSTRAINT = "the reader schema has a constraint here that the writer schema does not"
_LOWER_BOUND_RAISED = "the reader schema's lower bound here is higher than the writer schema's"
_UPPER_BOUND_LOWERED = "the reader schema's upper bound here is lower than the writer schema's"
_VALUE_CHANGED = "the value here differs between the reader and the writer schema"
_NARROWED = "the reader schema allows fewer alternatives here than the writer schema"
_EXTENDED = "the reader schema demands more here than the writer schema"
_TYPE_CHANGED = "the type here differs between the reader and the writer schema"

_DESCRIPTIONS = {
    "SCHEMA_ADDED": "the reader schema constrains something the writer schema leaves open",
    "TYPE_CHANGED": _TYPE_CHANGED,
    "TYPE_NARROWED": "the reader schema accepts only integers where the writer schema accepts any number",
    "COMBINED_TYPE_CHANGED": "the combination (allOf/anyOf/oneOf) here changed to a stricter one",
    "COMBINED_TYPE_SUBSCHEMAS_CHANGED": "some alternatives of the writer schema here have no compatible "
    "counterpart in the reader schema",
    "ENUM_ARRAY_CHANGED": "the allowed values here differ between the reader and the writer schema",
    "ENUM_ARRAY_NARROWED": "the reader schema allows fewer values here than the writer schema",
    "SUM_TYPE_NARROWED": _NARROWED,
    "ADDITIONAL_PROPERTIES_NARROWED": _NARROWED,
    "ADDITIONAL_ITEMS_NARROWED": _NARROWED,
    "UNEVALUATED_PROPERTIES_NARROWED": _NARROWED,
    "UNEVALUATED_ITEMS_NARROWED": _NARROWED,
    "PRODUCT_TYPE_EXTENDED": _EXTENDED,
    "NOT_TYPE_EXTENDED": "the reader schema excludes more here than the writer schema",
    "DEPENDENCY_ARRAY_EXTENDED": _EXTENDED,
    "DEPENDENCY_ARRAY_CHANGED": _VALUE_CHANGED,
    "PATTERN_CHANGED": _VALUE_CHANGED,
    "MULTIPLE_OF_CHANGED": _VALUE_CHANGED,
    "MULTIPLE_OF_EXPANDED": "the reader schema's multipleOf here is a multiple of the writer schema's",
    "PATTERN_ADDED": _ADDED_CONSTRAINT,
    "MULTIPLE_OF_ADDED": _ADDED_CONSTRAINT,
    "REQUIRED_ATTRIBUTE_ADDED": "the reader schema requires a property, without a default, that the writer "
    "schema has as optional",
    "DEPENDENCY_ARRAY_ADDED": _ADDED_CONSTRAINT,
    "DEPENDENCY_SCHEMA_ADDED": _ADDED_CONSTRAINT,
    "UNIQUE_ITEMS_ADDED": _ADDED_CONSTRAINT,
    "ADDITIONAL_PROPERTIES_REMOVED": "the reader schema forbids additional properties the writer allows",
    "ADDITIONAL_ITEMS_REMOVED": "the reader schema forbids additional items the writer allows",
    "UNEVALUATED_PROPERTIES_REMOVED": "the reader schema forbids unevaluated properties the writer allows",
    "UNEVALUATED_ITEMS_REMOVED": "the reader schema forbids unevaluated items the writer allows",
    "REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL": "the reader schema requires a property that the writer "
    "schema does not declare",
    "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_OPEN_CONTENT_MODEL": "the reader schema declares a property "
    "that the writer schema's open content model may have carried with any value",
    "OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL": "the reader schema declares a property that the writer "
    "schema's open content model may have carried with any value",
    "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL": "the reader schema requires a property, without a "
    "default, that the writer schema's closed content model never produces",
    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL": "the reader schema has a closed content model and lacks a "
    "property the writer schema declares",
    "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL": "the reader schema lacks a property the "
    "writer schema declares, and its additional or pattern properties do not accept it",
    "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL": "the reader schema declares a property "
    "that the writer schema's additional or pattern properties accept with incompatible values",
    "ITEM_ADDED_TO_OPEN_CONTENT_MODEL": "the reader schema constrains a tuple position that the writer "
    "schema's open content model may have filled with anything",
    "ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL": "the reader schema has a closed content model and lacks a "
    "tuple position the writer schema declares",
    "ITEM_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL": "the reader schema lacks a tuple position "
    "the writer schema declares, and its additional items do not accept it",
    "ITEM_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL": "the reader schema declares a tuple position "
    "that the writer schema's additional items fill with incompatible values",
}


def _bound_descriptions() -> dict[str, str]:
    descriptions = {}
    for prefix in (
        "MIN_LENGTH",
        "MINIMUM",
        "EXCLUSIVE_MINIMUM",
        "MIN_PROPERTIES",
        "MIN_ITEMS",
        "MIN_CONTAINS",
    ):
        descriptions[f"{prefix}_ADDED"] = _ADDED_CONSTRAINT
        descriptions[f"{prefix}_INCREASED"] = _LOWER_BOUND_RAISED
    for prefix in (
        "MAX_LENGTH",
        "MAXIMUM",
        "EXCLUSIVE_MAXIMUM",
        "MAX_PROPERTIES",
        "MAX_ITEMS",
        "MAX_CONTAINS",
    ):
        descriptions[f"{prefix}_ADDED"] = _ADDED_CONSTRAINT
        descriptions[f"{prefix}_DECREASED"] = _UPPER_BOUND_LOWERED
    return descriptions


_DESCRIPTIONS.update(_bound_descriptions())


@dataclass(frozen=True)
class Difference:
    kind: str
    path: str  # a JSON pointer into the schemas, "/properties/name"; "" is the root

    def __post_init__(self) -> None:
        assert self.kind in _DESCRIPTIONS, f"no description for {self.kind}"

    def __str__(self) -> str:
        return f"{self.kind} at #{self.path or '/'}: {_DESCRIPTIONS[self.kind]}"
