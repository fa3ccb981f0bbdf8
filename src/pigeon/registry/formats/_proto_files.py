"""Protobuf schema text to syntax trees: .proto source or a base64 ``FileDescriptorProto``.

Parsing is ``proto-schema-parser``'s (pure Python, proto2 and proto3); its parser recovers from
syntax errors by default, so errors are turned into exceptions here. A schema's imports are
found among its references; the well-known ``google/protobuf/*.proto`` files, which Confluent's
clients never register, come from the ``protobuf`` runtime.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib
import re
from collections.abc import Mapping
from typing import Any

from antlr4 import Parser as AntlrParser
from antlr4.error.ErrorListener import ErrorListener
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from proto_schema_parser import ast
from proto_schema_parser.generator import Generator
from proto_schema_parser.parser import Parser

from ..errors import InvalidSchemaError
from ._proto_descriptor import proto_text

__all__ = ["BUILTIN_PREFIXES", "ProtoSource", "canonical_text", "load_imports", "parse_source"]

# Files every Confluent registry knows without a reference (their clients skip registering them).
BUILTIN_PREFIXES = ("google/protobuf/", "google/type/", "confluent/")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


@dataclasses.dataclass(frozen=True)
class ProtoSource:
    name: str  # the import path ("" for the schema being registered)
    text: str  # as given: two references are the same file when name and text agree
    tree: ast.File


def parse_source(name: str, text: str) -> ProtoSource:
    what = "schema" if not name else f"referenced schema {name!r}"
    source = text.strip()
    if source and _BASE64.fullmatch(source):
        source = _descriptor_text(source, what)
    return ProtoSource(name, text, _parse(source, what))


def load_imports(root: ProtoSource, references: Mapping[str, str]) -> tuple[list[ProtoSource], bool]:
    """Every file ``root`` imports, directly or not, and whether some builtin one could not be loaded."""
    loaded: dict[str, ProtoSource] = {}
    opaque = False
    pending = _imports(root.tree)
    while pending:
        name = pending.pop()
        if name in loaded:
            continue
        if name in references:
            loaded[name] = parse_source(name, references[name])
        elif name.startswith(BUILTIN_PREFIXES):
            builtin = _builtin(name)
            if builtin is None:
                opaque = True
                continue
            loaded[name] = builtin
        else:
            raise InvalidSchemaError(
                f"invalid Protobuf schema: import {name!r} is not among the schema's references"
            )
        pending += _imports(loaded[name].tree)
    return list(loaded.values()), opaque


def canonical_text(tree: ast.File) -> str:
    """The source regenerated from its tree without comments: formatting and comments don't count."""
    return Generator().generate(_without_comments(tree))


def _parse(text: str, what: str) -> ast.File:
    listener = _RaisingListener()

    def setup(recognizer: Any) -> None:
        recognizer.removeErrorListeners()
        recognizer.addErrorListener(listener)

    try:
        return Parser(setup_lexer=setup, setup_parser=setup).parse(text)
    except _SyntaxError as error:
        raise InvalidSchemaError(f"invalid Protobuf {what}: {error}") from None


class _SyntaxError(Exception):
    pass


class _RaisingListener(ErrorListener):
    def syntaxError(
        self, recognizer: AntlrParser, offending: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        raise _SyntaxError(f"line {line}, column {column + 1}: {msg}")


def _descriptor_text(encoded: str, what: str) -> str:
    try:
        descriptor = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(encoded, validate=True))
        return proto_text(descriptor)
    except (binascii.Error, DecodeError, ValueError) as error:
        raise InvalidSchemaError(
            f"invalid Protobuf {what}: neither .proto text nor a base64 FileDescriptorProto ({error})"
        ) from None


def _builtin(name: str) -> ProtoSource | None:
    if not name.startswith("google/protobuf/"):
        return None
    module = name.removesuffix(".proto").replace("/", ".")
    try:
        importlib.import_module(module + "_pb2")
        file = descriptor_pool.Default().FindFileByName(name)
    except (ImportError, KeyError):
        return None
    text = proto_text(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))
    return ProtoSource(name, text, _parse(text, f"builtin {name!r}"))


def _imports(tree: ast.File) -> list[str]:
    return [element.name for element in tree.file_elements if isinstance(element, ast.Import)]


def _without_comments(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_comments(item) for item in node if not isinstance(item, ast.Comment)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _without_comments(getattr(node, f.name)) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    return node
