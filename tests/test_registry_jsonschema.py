"""The JSON Schema format: meta-schema checks, references, canonical form, Confluent's rules."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pigeon.registry.errors import InvalidSchemaError
from pigeon.registry.formats.jsonschema import FORMAT


def parse(schema: Any, references: dict[str, Any] | None = None) -> Any:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    refs = {name: json.dumps(ref) for name, ref in (references or {}).items()}
    return FORMAT.parse(text, refs)


def problems(reader: Any, writer: Any) -> list[str]:
    """The incompatibilities as "KIND #/path", the way Confluent's test suites spell them."""
    found = FORMAT.incompatibilities(parse(reader), parse(writer))
    return sorted(message.split(":")[0].replace(" at ", " ") for message in found)


def obj(properties: dict[str, Any], **keywords: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **keywords}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
CLOSED = {"additionalProperties": False}

# (old, new, what BACKWARD finds: reader=new/writer=old, what FORWARD finds: reader=old/writer=new)
CASES = {
    "type changed": (STRING, INTEGER, ["TYPE_CHANGED #/"], ["TYPE_CHANGED #/"]),
    "number narrowed to integer": ({"type": "number"}, INTEGER, ["TYPE_NARROWED #/"], []),
    "null added to the type": (STRING, {"type": ["string", "null"]}, [], ["TYPE_CHANGED #/"]),
    "anything may become the empty schema": (STRING, {}, [], ["TYPE_CHANGED #/"]),
    "maxLength lowered": (
        {"type": "string", "maxLength": 10},
        {"type": "string", "maxLength": 5},
        ["MAX_LENGTH_DECREASED #/maxLength"],
        [],
    ),
    "minLength raised": (
        {"type": "string", "minLength": 1},
        {"type": "string", "minLength": 2},
        ["MIN_LENGTH_INCREASED #/minLength"],
        [],
    ),
    "minimum added": (INTEGER, {"type": "integer", "minimum": 0}, ["MINIMUM_ADDED #/minimum"], []),
    "exclusiveMaximum lowered": (
        {"type": "number", "exclusiveMaximum": 10},
        {"type": "number", "exclusiveMaximum": 5},
        ["EXCLUSIVE_MAXIMUM_DECREASED #/exclusiveMaximum"],
        [],
    ),
    "pattern added": (STRING, {"type": "string", "pattern": "^a"}, ["PATTERN_ADDED #/pattern"], []),
    "pattern changed": (
        {"type": "string", "pattern": "^a"},
        {"type": "string", "pattern": "^b"},
        ["PATTERN_CHANGED #/pattern"],
        ["PATTERN_CHANGED #/pattern"],
    ),
    "multipleOf made coarser": (
        {"type": "number", "multipleOf": 0.1},
        {"type": "number", "multipleOf": 0.3},
        ["MULTIPLE_OF_EXPANDED #/multipleOf"],
        [],
    ),
    "multipleOf changed": (
        {"type": "number", "multipleOf": 2},
        {"type": "number", "multipleOf": 3},
        ["MULTIPLE_OF_CHANGED #/multipleOf"],
        ["MULTIPLE_OF_CHANGED #/multipleOf"],
    ),
    "enum value added": ({"enum": ["a", "b"]}, {"enum": ["a", "b", "c"]}, [], ["ENUM_ARRAY_NARROWED #/enum"]),
    "enum value replaced": (
        {"enum": ["a", "b"]},
        {"enum": ["a", "c"]},
        ["ENUM_ARRAY_CHANGED #/enum"],
        ["ENUM_ARRAY_CHANGED #/enum"],
    ),
    "const changed": (
        {"const": 1},
        {"const": 2},
        ["ENUM_ARRAY_CHANGED #/const"],
        ["ENUM_ARRAY_CHANGED #/const"],
    ),
    "property added to an open content model": (
        obj({"a": STRING}),
        obj({"a": STRING, "b": STRING}),
        ["OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL #/properties/b"],
        [],
    ),
    "required property added to an open content model": (
        obj({"a": STRING}),
        obj({"a": STRING, "b": STRING}, required=["b"]),
        ["REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL #/properties/b"],
        [],
    ),
    "property of any value added to an open content model": (
        obj({"a": STRING}),
        obj({"a": STRING, "b": {}}),
        [],
        [],
    ),
    "property added to a closed content model": (
        obj({"a": STRING}, **CLOSED),
        obj({"a": STRING, "b": STRING}, **CLOSED),
        [],
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL #/properties/b"],
    ),
    "required property added to a closed content model": (
        obj({"a": STRING}, **CLOSED),
        obj({"a": STRING, "b": STRING}, required=["b"], **CLOSED),
        ["REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL #/properties/b"],
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL #/properties/b"],
    ),
    "required property with a default added to a closed content model": (
        obj({"a": STRING}, **CLOSED),
        obj({"a": STRING, "b": {"type": "string", "default": ""}}, required=["b"], **CLOSED),
        [],
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL #/properties/b"],
    ),
    "existing property made required": (
        obj({"a": STRING}),
        obj({"a": STRING}, required=["a"]),
        ["REQUIRED_ATTRIBUTE_ADDED #/required/a"],
        [],
    ),
    "content model closed": (
        obj({"a": STRING}),
        obj({"a": STRING}, **CLOSED),
        ["ADDITIONAL_PROPERTIES_REMOVED #/additionalProperties"],
        [],
    ),
    "property covered by the additional properties": (
        obj({"a": STRING}, additionalProperties=STRING),
        obj({"a": STRING, "b": STRING}, additionalProperties=STRING),
        [],
        [],
    ),
    "property not covered by the additional properties": (
        obj({"a": STRING}, additionalProperties=STRING),
        obj({"a": STRING, "b": INTEGER}, additionalProperties=STRING),
        [
            "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL #/properties/b",
            "TYPE_CHANGED #/properties/b",
        ],
        [
            "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL #/properties/b",
            "TYPE_CHANGED #/properties/b",
        ],
    ),
    "nested property type changed": (
        obj({"a": obj({"b": STRING})}),
        obj({"a": obj({"b": INTEGER})}),
        ["TYPE_CHANGED #/properties/a/properties/b"],
        ["TYPE_CHANGED #/properties/a/properties/b"],
    ),
    "dependency added": (
        obj({"a": STRING, "b": STRING}),
        obj({"a": STRING, "b": STRING}, dependencies={"a": ["b"]}),
        ["DEPENDENCY_ARRAY_ADDED #/dependencies/a"],
        [],
    ),
    "maxProperties lowered": (
        {"type": "object", "maxProperties": 5},
        {"type": "object", "maxProperties": 3},
        ["MAX_PROPERTIES_DECREASED #/maxProperties"],
        [],
    ),
    "array item type changed": (
        {"type": "array", "items": STRING},
        {"type": "array", "items": INTEGER},
        ["TYPE_CHANGED #/items"],
        ["TYPE_CHANGED #/items"],
    ),
    "array items constrained": (
        {"type": "array"},
        {"type": "array", "items": STRING},
        ["SCHEMA_ADDED #/items"],
        [],
    ),
    "array limits tightened": (
        {"type": "array", "maxItems": 5},
        {"type": "array", "maxItems": 3, "uniqueItems": True},
        ["MAX_ITEMS_DECREASED #/maxItems", "UNIQUE_ITEMS_ADDED #/uniqueItems"],
        [],
    ),
    "tuple position added to an open tuple": (
        {"type": "array", "items": [STRING]},
        {"type": "array", "items": [STRING, INTEGER]},
        ["ITEM_ADDED_TO_OPEN_CONTENT_MODEL #/items/1"],
        [],
    ),
    "tuple position removed from a closed tuple (draft 2020-12)": (
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "prefixItems": [STRING, INTEGER],
            "items": False,
        },
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "prefixItems": [STRING], "items": False},
        ["ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL #/items/1"],
        [],
    ),
    "oneOf alternative removed": (
        {"oneOf": [STRING, INTEGER]},
        {"oneOf": [STRING]},
        ["SUM_TYPE_NARROWED #/"],
        [],
    ),
    "allOf part added": (
        {"allOf": [STRING]},
        {"allOf": [STRING, {"maxLength": 3}]},
        ["PRODUCT_TYPE_EXTENDED #/"],
        [],
    ),
    "anyOf alternatives replaced": (
        {"anyOf": [STRING, INTEGER]},
        {"anyOf": [STRING, {"type": "boolean"}]},
        ["COMBINED_TYPE_SUBSCHEMAS_CHANGED #/"],
        ["COMBINED_TYPE_SUBSCHEMAS_CHANGED #/"],
    ),
    "oneOf made allOf": (
        {"oneOf": [STRING, {"maxLength": 3}]},
        {"allOf": [STRING, {"maxLength": 3}]},
        ["COMBINED_TYPE_CHANGED #/"],
        ["COMBINED_TYPE_CHANGED #/"],
    ),
    "oneOf made anyOf": (
        {"oneOf": [STRING, INTEGER]},
        {"anyOf": [STRING, INTEGER]},
        [],
        ["COMBINED_TYPE_CHANGED #/"],
    ),
    "plain type made an alternative of a union": (
        STRING,
        {"oneOf": [STRING, INTEGER]},
        [],
        ["TYPE_CHANGED #/"],
    ),
    "not widened": (
        {"not": STRING},
        {"not": {"type": ["string", "integer"]}},
        ["NOT_TYPE_EXTENDED #/not"],
        [],
    ),
    "same schema through a local $ref": (
        obj({"a": STRING}),
        {"definitions": {"s": STRING}, **obj({"a": {"$ref": "#/definitions/s"}})},
        [],
        [],
    ),
    "type changed behind a local $ref": (
        {"definitions": {"s": STRING}, **obj({"a": {"$ref": "#/definitions/s"}})},
        {"definitions": {"s": INTEGER}, **obj({"a": {"$ref": "#/definitions/s"}})},
        ["TYPE_CHANGED #/properties/a"],
        ["TYPE_CHANGED #/properties/a"],
    ),
}


@pytest.mark.parametrize(("old", "new", "backward", "forward"), CASES.values(), ids=CASES.keys())
def test_rules_both_directions(old: Any, new: Any, backward: list[str], forward: list[str]) -> None:
    assert problems(reader=new, writer=old) == sorted(backward)
    assert problems(reader=old, writer=new) == sorted(forward)


def test_a_schema_is_compatible_with_itself() -> None:
    for old, new, _, _ in CASES.values():
        assert problems(old, old) == []
        assert problems(new, new) == []


def test_messages_say_where_and_why() -> None:
    [message] = FORMAT.incompatibilities(parse(obj({"a": INTEGER})), parse(obj({"a": STRING})))
    assert message.startswith("TYPE_CHANGED at #/properties/a: ")
    assert "reader" in message and "writer" in message


RECURSIVE = {"type": "object", "properties": {"value": INTEGER, "next": {"$ref": "#"}}}


def test_recursive_schemas_terminate() -> None:
    widened = {"type": "object", "properties": {"value": {"type": "number"}, "next": {"$ref": "#"}}}
    assert problems(reader=widened, writer=RECURSIVE) == []
    assert problems(reader=RECURSIVE, writer=widened) == ["TYPE_NARROWED #/properties/value"]


ADDRESS = obj({"street": STRING})
CUSTOMER = obj({"home": {"$ref": "address.json"}})


def test_reference_by_name() -> None:
    parsed = parse(CUSTOMER, {"address.json": ADDRESS})
    changed = parse(CUSTOMER, {"address.json": obj({"street": INTEGER})})
    assert FORMAT.incompatibilities(changed, parsed)[0].startswith(
        "TYPE_CHANGED at #/properties/home/properties/street"
    )
    assert FORMAT.incompatibilities(parse(CUSTOMER, {"address.json": ADDRESS}), parsed) == []


def test_relative_reference_under_an_absolute_id() -> None:
    customer = {"$id": "https://example.com/schemas/customer.json", **CUSTOMER}
    assert parse(customer, {"address.json": ADDRESS}).root is not None


def test_reference_by_its_own_id() -> None:
    address = {"$id": "https://example.com/address.json", **ADDRESS}
    customer = obj({"home": {"$ref": "https://example.com/address.json"}})
    assert parse(customer, {"addresses-value": address}).root is not None


def test_transitive_references() -> None:
    street = {"type": "string", "maxLength": 80}
    address = obj({"street": {"$ref": "street.json"}})
    before = parse(CUSTOMER, {"address.json": address, "street.json": street})
    after = parse(CUSTOMER, {"address.json": address, "street.json": {"type": "string", "maxLength": 40}})
    assert [m.split(":")[0] for m in FORMAT.incompatibilities(after, before)] == [
        "MAX_LENGTH_DECREASED at #/properties/home/properties/street/maxLength"
    ]


INVALID = {
    "not JSON": ("{", "not JSON"),
    "unknown type": ({"type": "strin"}, "at type"),
    "negative minLength": ({"properties": {"a": {"minLength": -1}}}, "properties/a/minLength"),
    "not an object": ([], "at the top level"),
    "unknown $schema": ({"$schema": "http://example.com/my-draft"}, "unknown $schema"),
    "unresolved $ref": (obj({"a": {"$ref": "missing.json"}}), "'missing.json' does not resolve"),
    "dangling local $ref": ({"$ref": "#/definitions/nope"}, "does not resolve"),
    "bad regular expression": ({"type": "string", "pattern": "("}, "regex"),
    "$ref to itself": ({"$ref": "#"}, "only refers to itself"),
}


@pytest.mark.parametrize(("schema", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_schemas_are_refused_with_a_reason(schema: Any, expected: str) -> None:
    with pytest.raises(InvalidSchemaError, match="invalid JSON schema") as raised:
        parse(schema)
    assert expected in str(raised.value)
    assert raised.value.error_code == 42201


def test_an_invalid_reference_is_named() -> None:
    with pytest.raises(InvalidSchemaError, match=r"referenced schema 'address\.json'"):
        FORMAT.parse(json.dumps(CUSTOMER), {"address.json": '{"type": 12}'})


def test_canonical_form_ignores_formatting_only() -> None:
    compact = parse('{"type":"object","properties":{"a":{"type":"string"}}}')
    spaced = parse('{\n  "type": "object",\n  "properties": {\n    "a": { "type": "string" }\n  }\n}\n')
    assert FORMAT.canonical(compact) == FORMAT.canonical(spaced)
    assert FORMAT.canonical(parse(FORMAT.canonical(spaced))) == FORMAT.canonical(spaced)
    assert FORMAT.canonical(parse(obj({"a": INTEGER}))) != FORMAT.canonical(compact)


def test_type_name() -> None:
    assert FORMAT.type_name == "JSON"
