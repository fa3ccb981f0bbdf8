"""Compatibility levels, with Confluent's meaning.

BACKWARD: the new schema can read data written with the previous one (consumers upgrade first).
FORWARD: the previous schema can read data written with the new one (producers upgrade first).
FULL: both. Without ``_TRANSITIVE`` only the latest version is compared; with it, every version.
NONE: no check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .formats import SchemaFormat

__all__ = ["DEFAULT_LEVEL", "LEVELS", "Previous", "problems"]

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
DEFAULT_LEVEL = "BACKWARD"


@dataclass(frozen=True)
class Previous:
    """A registered version to compare a candidate with."""

    version: int
    schema_type: str
    parsed: Any


def problems(
    level: str, schema_format: SchemaFormat, candidate: Any, previous: Sequence[Previous]
) -> list[str]:
    """Why ``candidate`` breaks ``level`` against ``previous`` (oldest first); [] when it does not."""
    if level == "NONE" or not previous:
        return []
    against = previous if level.endswith("_TRANSITIVE") else previous[-1:]
    found: list[str] = []
    for old in reversed(against):
        if old.schema_type != schema_format.type_name:
            found.append(
                f"version {old.version} is a {old.schema_type} schema, not {schema_format.type_name}"
            )
            continue
        if level.startswith(("BACKWARD", "FULL")):
            found += [
                f"the new schema cannot read data written with version {old.version}: {problem}"
                for problem in schema_format.incompatibilities(candidate, old.parsed)
            ]
        if level.startswith(("FORWARD", "FULL")):
            found += [
                f"version {old.version} cannot read data written with the new schema: {problem}"
                for problem in schema_format.incompatibilities(old.parsed, candidate)
            ]
    return found
