"""JSON Schema: checked against its meta-schema with ``jsonschema``, compared with Confluent's rules.

The draft is the one ``$schema`` names, draft 7 when it names none (Confluent's default).
References are other registered JSON schemas, found by the name they are registered under (the
``$ref`` text, or its last path segment when the schema's ``$id`` makes it an absolute URL) or
by their own ``$id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft7Validator, validator_for
from referencing import Registry, Resource, Specification
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import specification_with

from ..errors import InvalidSchemaError
from ._json_diff import check
from ._json_model import Schema, load

__all__ = ["FORMAT", "JsonSchemaFormat", "ParsedJsonSchema"]


@dataclass(frozen=True, eq=False)
class ParsedJsonSchema:
    document: Any
    root: Schema


class JsonSchemaFormat:
    type_name = "JSON"

    def parse(self, text: str, references: Mapping[str, str]) -> ParsedJsonSchema:
        document = _checked(text, "schema")
        specification = _specification(document)
        resources = {
            name: Resource.from_contents(
                _checked(ref_text, f"referenced schema {name!r}"), default_specification=specification
            )
            for name, ref_text in references.items()
        }

        def retrieve(uri: str) -> Resource[Any]:
            # A relative $ref in a schema with an absolute $id names a reference by its last segments.
            for name, resource in resources.items():
                if uri.endswith("/" + name.lstrip("/")):
                    return resource
            raise NoSuchResource(uri)

        pairs = list(resources.items())
        pairs += [(uri, resource) for resource in resources.values() if (uri := resource.id()) is not None]
        root = specification.create_resource(document)
        base_uri = root.id() or ""
        # retrieve is a documented argument that the attrs-generated signature spells _retrieve.
        registry: Registry[Any] = Registry(retrieve=retrieve)  # type: ignore[call-arg]
        registry = registry.with_resources([*pairs, (base_uri, root)])
        return ParsedJsonSchema(document, load(document, registry.resolver(base_uri), specification))

    def canonical(self, parsed: ParsedJsonSchema) -> str:
        # Key order is kept: code generators follow the order of "properties".
        return json.dumps(parsed.document, separators=(",", ":"), ensure_ascii=False)

    def incompatibilities(self, reader: ParsedJsonSchema, writer: ParsedJsonSchema) -> list[str]:
        return [str(difference) for difference in check(reader.root, writer.root)]


def _checked(text: str, what: str) -> Any:
    try:
        document = json.loads(text)
    except (TypeError, ValueError) as error:
        raise InvalidSchemaError(f"invalid JSON {what}: not JSON: {error}") from None
    validator = _validator(document, what)
    try:
        validator.check_schema(document)
    except SchemaError as error:
        where = "/".join(str(part) for part in error.path) or "the top level"
        raise InvalidSchemaError(f"invalid JSON {what}: at {where}: {error.message}") from None
    return document


def _validator(document: Any, what: str) -> Any:
    validator = validator_for(document, default=Draft7Validator)
    named = document.get("$schema") if isinstance(document, dict) else None
    # validator_for falls back to the default for a $schema it does not know: refuse that instead.
    if named is not None and str(named).rstrip("#") != validator.META_SCHEMA["$schema"].rstrip("#"):
        raise InvalidSchemaError(f"invalid JSON {what}: unknown $schema {named!r}")
    return validator


def _specification(document: Any) -> Specification[Any]:
    dialect = _validator(document, "schema").META_SCHEMA["$schema"]
    return specification_with(dialect)


FORMAT = JsonSchemaFormat()
