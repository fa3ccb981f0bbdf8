"""Fuzzing the HTTP side of a running `pigeon serve`.

- The admin API with schemathesis, from its own OpenAPI document: positive and negative
  examples per operation, checked for server errors and for conformance (documented status,
  content type and body schema).
- The schema registry (under ``/registry``) with hypothesis: requests built from the routes'
  vocabulary plus junk (paths, methods, query strings, bodies that are broken JSON, wrong
  types, schemas that do not parse), checked for no 5xx and a JSON error body (Confluent's
  ``error_code`` and ``message``) on every 4xx.

Problems are collected, not raised: one per operation and mode for schemathesis (it shrinks
to a minimal example with a curl line), one per kind for the registry. A server error is a
failure; a client error answered in the wrong shape is a finding.
"""

from __future__ import annotations

import json
import string
from typing import Any
from urllib.parse import quote

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .common import Report

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )


def admin_api(http_url: str, examples: int, report: Report, known: dict[str, str]) -> None:
    """``known`` names things that exist (``{"stream": ..., "group": ...}``): random names
    almost never do, so each operation also runs with its path parameters set to them."""
    schema = schemathesis.openapi.from_url(f"{http_url}/api/openapi.json")
    calls = operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        existing = {name: value for name, value in known.items() if f"{{{name}}}" in operation.path}
        for mode, path_parameters in [(m, None) for m in MODES] + (
            [(MODES[0], existing)] if existing else []
        ):

            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            @_settings(examples)
            def check(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                case.validate_response(case.call(timeout=10), checks=CHECKS)

            try:
                check()
            except Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters)
            except (Exception, FailureGroup) as error:
                names = path_parameters or "random names"
                label = f"{operation.method.upper()} {operation.path} ({mode.value}, {names})"
                server_error = "Server error" in str(error)
                kind = "admin_server_errors" if server_error else "admin_nonconforming_operations"
                report.figures[kind] = report.figures.get(kind, 0) + 1
                (report.fail if server_error else report.note)(f"admin API {label}: {_short(error)}")
    report.figures["admin_operations"] = operations
    report.figures["admin_requests"] = calls


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:600]


_WORDS = ["subjects", "schemas", "ids", "versions", "latest", "-1", "1", "0", "999999", "config", "mode"]
_WORDS += ["compatibility", "referencedby", "schema", "types", "associations", "resources", "s-value", ""]
_TEXT = st.text(string.printable + "äé€\x00", max_size=12)
_SEGMENT = st.one_of(st.sampled_from(_WORDS), _TEXT.map(lambda t: t.replace("/", "")))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_SCHEMAS = st.sampled_from(
    ['{"type": "string"}', '{"type": "record", "name": "r", "fields": []}', "syntax = 'proto3';", "{", ""]
)
_BODY_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "schema": _SCHEMAS | _TEXT,
        "schemaType": st.sampled_from(["AVRO", "JSON", "PROTOBUF", "XML", ""]) | _JSON,
        "references": _JSON,
        "compatibility": st.sampled_from(["BACKWARD", "FULL", "NONE", "bogus"]) | _JSON,
        "mode": st.sampled_from(["READWRITE", "READONLY", "IMPORT", "bogus"]) | _JSON,
        "version": _JSON,
        "id": _JSON,
    },
)
_BODY = st.one_of(
    st.none(),
    _BODY_FIELDS.map(json.dumps),
    _JSON.map(json.dumps),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
_REQUEST = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    st.lists(_SEGMENT, max_size=5),
    st.dictionaries(st.sampled_from(["normalize", "deleted", "permanent", "verbose", "subject", "x"]), _TEXT),
    _BODY,
)


def registry_api(http_url: str, examples: int, report: Report) -> None:
    base = f"{http_url}/registry"
    calls = 0
    seen: set[tuple[str, str]] = set()
    with httpx.Client(timeout=10) as client:

        @given(request=_REQUEST)
        @_settings(examples)
        def check(request: tuple[str, list[str], dict[str, str], str | None]) -> None:
            nonlocal calls
            method, segments, query, body = request
            path = "/".join(quote(s, safe="") for s in segments)
            headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
            response = client.request(method, f"{base}/{path}", params=query, content=body, headers=headers)
            calls += 1
            problem = _registry_problem(response)
            if problem:
                kind = "registry_server_errors" if response.status_code >= 500 else "registry_non_json_errors"
                report.figures[kind] = report.figures.get(kind, 0) + 1
                # Generated requests repeat a problem with small variations: one line per kind.
                if (method, problem) not in seen:
                    seen.add((method, problem))
                    line = f"registry {method} /{path}?{query} body={body!r:.120}: {problem}"
                    (report.fail if response.status_code >= 500 else report.note)(line)

        check()
    report.figures["registry_requests"] = calls


def _registry_problem(response: httpx.Response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:200]}"
    if response.status_code < 400:
        return None
    try:
        body: Any = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:60]!r}"
    if not (isinstance(body, dict) and isinstance(body.get("error_code"), int) and "message" in body):
        return f"{response.status_code} body is not a registry error: {body!r:.200}"
    return None
