"""Schema formats, looked up by Confluent's type name: ``AVRO`` (the default), ``JSON``, ``PROTOBUF``.

Each format module exposes a module-level ``FORMAT`` that satisfies :class:`SchemaFormat`. The
modules are imported on first use, so a format whose module is missing (or whose library is not
installed) only makes that schema type unsupported.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import InvalidSchemaError

__all__ = ["DEFAULT_TYPE", "SCHEMA_TYPES", "SchemaFormat", "available_types", "get_format"]

DEFAULT_TYPE = "AVRO"

_MODULES = {"AVRO": "avro", "JSON": "jsonschema", "PROTOBUF": "protobuf"}
SCHEMA_TYPES = tuple(_MODULES)


class SchemaFormat(Protocol):
    type_name: str  # "AVRO" | "JSON" | "PROTOBUF"

    def parse(self, text: str, references: Mapping[str, str]) -> Any:
        """Parse ``text``; ``references`` maps each reference name (all transitive ones) to its text,
        a reference's own references before it.

        Raises InvalidSchemaError with a clear message.
        """

    def canonical(self, parsed: Any) -> str:
        """Normalized text: the same schema registered twice gets the same id."""

    def incompatibilities(self, reader: Any, writer: Any) -> list[str]:
        """Why data written with ``writer`` cannot be read with ``reader``; [] means compatible."""


def get_format(type_name: str | None) -> SchemaFormat:
    """The format for a Confluent schema type name (None means AVRO)."""
    name = DEFAULT_TYPE if type_name is None else type_name
    module_name = _MODULES.get(name) if isinstance(name, str) else None
    if module_name is None:
        raise InvalidSchemaError(f"unsupported schema type {name!r}: use one of {', '.join(SCHEMA_TYPES)}")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        raise InvalidSchemaError(f"unsupported schema type {name!r}: {error}") from None
    schema_format: SchemaFormat = module.FORMAT
    return schema_format


def available_types() -> list[str]:
    """The schema types whose format module imports (what ``GET /schemas/types`` answers)."""
    types = []
    for name in SCHEMA_TYPES:
        try:
            get_format(name)
        except InvalidSchemaError:
            continue
        types.append(name)
    return types
