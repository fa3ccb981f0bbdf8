"""Avro's own compatibility test suite, run against pigeon's checker instead of avro's.

The suite ships in the ``avro`` package (``avro/test/test_compatibility.py``). Its cases call
``ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)`` and read
``compatibility``, ``messages`` and ``locations``; the module-level name is swapped for an adapter
over :func:`pigeon.registry.formats._avro_resolution.check`, so every assertion judges our rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from avro.schema import Schema

from pigeon.registry.formats._avro_resolution import check

suite = importlib.import_module("avro.test.test_compatibility")


@dataclass
class _Result:
    compatibility: object
    messages: set[str] = field(default_factory=set)
    locations: set[str] = field(default_factory=lambda: {"/"})


class _PigeonChecker:
    def get_compatibility(self, reader: Schema, writer: Schema) -> _Result:
        problems = check(reader, writer)
        if not problems:
            return _Result(suite.SchemaCompatibilityType.compatible)
        return _Result(
            suite.SchemaCompatibilityType.incompatible,
            {problem.detail for problem in problems},
            {problem.location for problem in problems},
        )


@pytest.fixture(autouse=True)
def _pigeon_checker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(suite, "ReaderWriterCompatibilityChecker", _PigeonChecker)
    yield


def test_suite_calls_the_substituted_checker() -> None:
    assert suite.ReaderWriterCompatibilityChecker is _PigeonChecker


class TestAvroCompatibilitySuite(suite.TestCompatibility):  # type: ignore[misc,name-defined]
    """Every case of avro's suite, with the checker above in place."""
