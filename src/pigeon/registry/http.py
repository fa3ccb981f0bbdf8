"""Confluent's Schema Registry REST API over a :class:`SchemaRegistry`, as a Starlette app.

Routing works on the raw path split at ``/`` and then percent-decoded, so a subject holding an
encoded ``/`` (``%2F``) stays one path segment. Every refusal is a JSON body
``{"error_code": N, "message": "..."}`` with Confluent's code; only a bug in pigeon is a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import errors
from .formats import available_types
from .registry import Candidate, SchemaRegistry
from .state import SchemaEntry, VersionEntry
from .versions import MAX_VERSION, parse_version

__all__ = ["CONTENT_TYPE", "create_registry_app"]

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]  # the others answered 405 as JSON
# Fields of a schema request pigeon stores or can safely ignore when empty.
_SCHEMA_FIELDS = {"schema", "schemaType", "references", "id", "version", "metadata", "ruleSet"}

log = logging.getLogger("pigeon.registry")

Handler = Callable[[Request, dict[str, str]], Awaitable[Any]]


def create_registry_app(registry: SchemaRegistry) -> Starlette:
    """The REST API; mount it anywhere (``pigeon serve`` puts it under ``/registry``)."""
    api = _Api(registry)

    async def endpoint(request: Request) -> Response:
        try:
            handler, params = api.route(request.method, _segments(request))
            result = await handler(request, params)
        except errors.RegistryError as error:
            return _json({"error_code": error.error_code, "message": str(error)}, error.status)
        except Exception:
            log.exception("registry request %s %s failed", request.method, request.url.path)
            return _json({"error_code": 50001, "message": "Error in the backend data store"}, 500)
        if isinstance(result, Response):
            return result
        return _json(result)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=_METHODS)])


class _NotFound(errors.RegistryError):
    error_code = 404
    status = 404


class _MethodNotAllowed(errors.RegistryError):
    error_code = 405
    status = 405


class _Api:
    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self.routes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("GET", (), self.root),
            ("GET", ("schemas", "types"), self.schema_types),
            ("GET", ("schemas", "ids", "{id}"), self.schema_by_id),
            ("GET", ("schemas", "ids", "{id}", "schema"), self.schema_text_by_id),
            ("GET", ("schemas", "ids", "{id}", "subjects"), self.schema_subjects),
            ("GET", ("schemas", "ids", "{id}", "versions"), self.schema_versions),
            ("GET", ("subjects",), self.subjects),
            ("POST", ("subjects", "{subject}"), self.lookup),
            ("DELETE", ("subjects", "{subject}"), self.delete_subject),
            ("GET", ("subjects", "{subject}", "versions"), self.versions),
            ("POST", ("subjects", "{subject}", "versions"), self.register),
            ("GET", ("subjects", "{subject}", "versions", "{version}"), self.version),
            ("DELETE", ("subjects", "{subject}", "versions", "{version}"), self.delete_version),
            ("GET", ("subjects", "{subject}", "versions", "{version}", "schema"), self.version_text),
            ("GET", ("subjects", "{subject}", "versions", "{version}", "referencedby"), self.referenced_by),
            ("POST", ("compatibility", "subjects", "{subject}", "versions"), self.compatibility),
            ("POST", ("compatibility", "subjects", "{subject}", "versions", "{version}"), self.compatibility),
            ("GET", ("config",), self.get_config),
            ("PUT", ("config",), self.put_config),
            ("DELETE", ("config",), self.delete_config),
            ("GET", ("config", "{subject}"), self.get_config),
            ("PUT", ("config", "{subject}"), self.put_config),
            ("DELETE", ("config", "{subject}"), self.delete_config),
            ("GET", ("mode",), self.get_mode),
            ("PUT", ("mode",), self.put_mode),
            ("GET", ("mode", "{subject}"), self.get_mode),
            ("PUT", ("mode", "{subject}"), self.put_mode),
            ("DELETE", ("mode", "{subject}"), self.delete_mode),
            ("GET", ("associations", "resources", "{namespace}", "{resource}"), self.associations),
        ]

    def route(self, method: str, segments: list[str]) -> tuple[Handler, dict[str, str]]:
        path_matched = False
        for route_method, pattern, handler in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            path_matched = True
            if route_method == method:
                return handler, params
        if path_matched:
            raise _MethodNotAllowed(f"HTTP 405 Method Not Allowed: {method}")
        raise _NotFound("HTTP 404 Not Found")

    # -- schemas -------------------------------------------------------------------------------

    async def root(self, request: Request, params: dict[str, str]) -> Any:
        return {}

    async def schema_types(self, request: Request, params: dict[str, str]) -> Any:
        return available_types()

    async def schema_by_id(self, request: Request, params: dict[str, str]) -> Any:
        return _schema_json(self.registry.schema(_schema_id(params["id"])))

    async def schema_text_by_id(self, request: Request, params: dict[str, str]) -> Any:
        return _raw(self.registry.schema(_schema_id(params["id"])).text)

    async def schema_subjects(self, request: Request, params: dict[str, str]) -> Any:
        usages = self.registry.usages(_schema_id(params["id"]), deleted=_flag(request, "deleted"))
        return sorted({entry.subject for entry in usages})

    async def schema_versions(self, request: Request, params: dict[str, str]) -> Any:
        usages = self.registry.usages(_schema_id(params["id"]), deleted=_flag(request, "deleted"))
        return [{"subject": entry.subject, "version": entry.version} for entry in usages]

    # -- subjects ------------------------------------------------------------------------------

    async def subjects(self, request: Request, params: dict[str, str]) -> Any:
        prefix = request.query_params.get("subjectPrefix", "")
        return self.registry.subjects(deleted=_flag(request, "deleted"), prefix=prefix)

    async def lookup(self, request: Request, params: dict[str, str]) -> Any:
        candidate, _, _ = _candidate(await _body(request))
        entry = self.registry.lookup(params["subject"], candidate, deleted=_flag(request, "deleted"))
        return self._version_json(entry)

    async def register(self, request: Request, params: dict[str, str]) -> Any:
        candidate, schema_id, version = _candidate(await _body(request))
        entry = await self.registry.register(
            params["subject"], candidate, schema_id=schema_id, version=version
        )
        return self._version_json(entry)

    async def versions(self, request: Request, params: dict[str, str]) -> Any:
        entries = self.registry.versions(params["subject"], deleted=_flag(request, "deleted"))
        return [entry.version for entry in entries]

    async def version(self, request: Request, params: dict[str, str]) -> Any:
        return self._version_json(self._entry(request, params))

    async def version_text(self, request: Request, params: dict[str, str]) -> Any:
        return _raw(self.registry.schema(self._entry(request, params).schema_id).text)

    async def referenced_by(self, request: Request, params: dict[str, str]) -> Any:
        return self.registry.referenced_by(params["subject"], parse_version(params["version"]))

    async def delete_subject(self, request: Request, params: dict[str, str]) -> Any:
        return await self.registry.delete_subject(params["subject"], permanent=_flag(request, "permanent"))

    async def delete_version(self, request: Request, params: dict[str, str]) -> Any:
        version = parse_version(params["version"])
        return await self.registry.delete_version(
            params["subject"], version, permanent=_flag(request, "permanent")
        )

    async def compatibility(self, request: Request, params: dict[str, str]) -> Any:
        version = parse_version(params["version"]) if "version" in params else None
        candidate, _, _ = _candidate(await _body(request))
        found = self.registry.compatibility_problems(params["subject"], candidate, version)
        answer: dict[str, Any] = {"is_compatible": not found}
        if _flag(request, "verbose"):
            answer["messages"] = found
        return answer

    def _entry(self, request: Request, params: dict[str, str]) -> VersionEntry:
        version = parse_version(params["version"])
        return self.registry.version(params["subject"], version, deleted=_flag(request, "deleted"))

    def _version_json(self, entry: VersionEntry) -> dict[str, Any]:
        schema = self.registry.schema(entry.schema_id)
        return {"subject": entry.subject, "version": entry.version, "id": entry.schema_id} | _schema_json(
            schema
        )

    # -- config and mode -----------------------------------------------------------------------

    async def get_config(self, request: Request, params: dict[str, str]) -> Any:
        default_to_global = _flag(request, "defaultToGlobal")
        level = self.registry.compatibility(params.get("subject"), default_to_global=default_to_global)
        return {"compatibilityLevel": level}

    async def put_config(self, request: Request, params: dict[str, str]) -> Any:
        body = await _body(request)
        _only(body, {"compatibility", "compatibilityLevel", "normalize"})
        level = body.get("compatibility", body.get("compatibilityLevel"))
        if level is None:
            raise errors.InvalidCompatibilityError('give the level as {"compatibility": "BACKWARD"}')
        return {"compatibility": await self.registry.set_compatibility(params.get("subject"), level)}

    async def delete_config(self, request: Request, params: dict[str, str]) -> Any:
        return {"compatibilityLevel": await self.registry.delete_compatibility(params.get("subject"))}

    async def get_mode(self, request: Request, params: dict[str, str]) -> Any:
        default_to_global = _flag(request, "defaultToGlobal")
        return {"mode": self.registry.mode(params.get("subject"), default_to_global=default_to_global)}

    async def put_mode(self, request: Request, params: dict[str, str]) -> Any:
        body = await _body(request)
        _only(body, {"mode"})
        mode = await self.registry.set_mode(
            params.get("subject"), body.get("mode"), force=_flag(request, "force")
        )
        return {"mode": mode}

    async def delete_mode(self, request: Request, params: dict[str, str]) -> Any:
        return {"mode": await self.registry.delete_mode(params["subject"])}

    async def associations(self, request: Request, params: dict[str, str]) -> Any:
        # Subject associations are not implemented: clients that ask (confluent-kafka 2.14+
        # before registering) fall back to their subject name strategy on an empty answer.
        return []


def _segments(request: Request) -> list[str]:
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    root = request.scope.get("root_path", "").encode()
    if root and raw.startswith(root):
        raw = raw[len(root) :]
    try:
        return [unquote_to_bytes(part).decode() for part in raw.split(b"/") if part]
    except UnicodeDecodeError:
        raise errors.BadRequestError("the request path is not valid UTF-8 once percent-decoded") from None


def _match(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params = {}
    for expected, actual in zip(pattern, segments, strict=True):
        if expected.startswith("{"):
            params[expected[1:-1]] = actual
        elif expected != actual:
            return None
    return params


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise errors.BadRequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise errors.UnprocessableRequestError(
            f"the request body must be a JSON object, not {type(body).__name__}"
        )
    return body


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise errors.UnprocessableRequestError(f"Unrecognized field: {unknown[0]}")


def _candidate(body: dict[str, Any]) -> tuple[Candidate, int | None, int | None]:
    _only(body, _SCHEMA_FIELDS)
    for unsupported in ("metadata", "ruleSet"):
        if body.get(unsupported):
            raise errors.UnprocessableRequestError(f"pigeon's registry does not support {unsupported}")
    schema, schema_type = body.get("schema"), body.get("schemaType")
    references = body.get("references") or []
    if not isinstance(schema, str):
        raise errors.InvalidSchemaError('the request needs the schema as a string in "schema"')
    if schema_type is not None and not isinstance(schema_type, str):
        raise errors.InvalidSchemaError(f"schemaType must be a string, not {schema_type!r}")
    if not isinstance(references, list) or not all(isinstance(item, dict) for item in references):
        raise errors.InvalidSchemaError("references must be a list of {name, subject, version} objects")
    return Candidate(schema, schema_type, references), _number(body, "id"), _number(body, "version")


def _number(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None or (name == "id" and value == -1):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        error = errors.InvalidVersionError if name == "version" else errors.UnprocessableRequestError
        raise error(f"{name} must be an integer from 1 to {MAX_VERSION}, not {value!r}")
    return value


def _schema_id(text: str) -> int:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_VERSION:
        return int(text)
    raise errors.SchemaNotFoundError(f"Schema {text} not found")


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None or value.lower() in ("false", ""):
        return False
    if value.lower() == "true":
        return True
    raise errors.BadRequestError(f"query parameter {name} must be true or false, not {value!r}")


def _schema_json(schema: SchemaEntry) -> dict[str, Any]:
    answer: dict[str, Any] = {"schema": schema.text}
    if schema.schema_type != "AVRO":
        answer["schemaType"] = schema.schema_type
    if schema.references:
        answer["references"] = [reference.to_json() for reference in schema.references]
    return answer


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=CONTENT_TYPE)


def _raw(text: str) -> Response:
    return Response(text, media_type=CONTENT_TYPE)
