"""The OpenAPI 3.1 document of the admin API, served at ``/api/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_OBJECT = {"type": "object"}
_STREAM = {"name": "stream", "in": "path", "required": True, "schema": {"type": "string"}}
_GROUP = {"name": "group", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, kind: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": kind},
        "description": description,
    }


def _op(
    summary: str, params: list[dict[str, Any]], body: dict[str, Any] | None = None, ok: str = "200"
) -> dict[str, Any]:
    errors = {
        code: {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for code, text in (
            ("400", "a malformed request"),
            ("401", "a token is configured and the request lacks it"),
            ("404", "no such stream, group, message or dead letter"),
            ("409", "refused in the current state"),
            ("422", "a field is missing or has the wrong type"),
        )
    }
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {
            ok: {"description": "done", "content": {"application/json": {"schema": _OBJECT}}},
            **errors,
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


_CREATE = {
    "type": "object",
    "required": ["name", "subjects"],
    "properties": {
        "name": {"type": "string"},
        "subjects": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "partitions": {"type": "integer", "minimum": 1},
        "max_age_s": {"type": "number"},
        "max_msgs": {"type": "integer"},
        "max_bytes": {"type": "integer"},
        "dedup_window_s": {"type": "number"},
    },
}
_SELECTION = {
    "type": "object",
    "properties": {
        "ids": {"type": "array", "items": {"type": "string"}},
        "all": {"type": "boolean"},
        "confirm": {"type": "boolean", "description": "required (true) to purge"},
    },
}
_RESET = {
    "type": "object",
    "required": ["to"],
    "properties": {
        "to": {"type": "string", "enum": ["earliest", "latest", "offset", "time"]},
        "value": {"type": "number", "description": "the offset, or the time in seconds since the epoch"},
    },
}
_LIMIT = _query("limit", "integer", "how many at most")

_G = "/api/streams/{stream}/groups/{group}"
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "pigeon serve admin API", "version": "1"},
    "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
    "security": [{"token": []}, {}],
    "paths": {
        "/api/health": {"get": _op("every group's health status", [])},
        "/api/ready": {"get": _op("ready when the engine is open and NATS is listening", [])},
        "/api/openapi.json": {"get": _op("this document", [])},
        "/api/streams": {
            "get": _op("every stream with its partitions and groups", []),
            "post": _op("create a stream", [], _CREATE, ok="201"),
        },
        "/api/streams/{stream}": {
            "get": _op("a stream: configuration, partitions with offsets, groups", [_STREAM]),
            "delete": _op("delete a stream, its groups and their dead letters", [_STREAM]),
        },
        "/api/streams/{stream}/purge": {"post": _op("remove every message (offsets continue)", [_STREAM])},
        "/api/streams/{stream}/messages": {
            "get": _op(
                "browse a partition from an offset or a time",
                [
                    _STREAM,
                    _query("partition", "integer", "default 0"),
                    _query("offset", "integer", "first offset"),
                    _query("since", "number", "first time, seconds since the epoch"),
                    _LIMIT,
                ],
            )
        },
        "/api/streams/{stream}/messages/{partition}/{offset}": {
            "get": _op(
                "one message",
                [
                    _STREAM,
                    {"name": "partition", "in": "path", "required": True, "schema": {"type": "integer"}},
                    {"name": "offset", "in": "path", "required": True, "schema": {"type": "integer"}},
                ],
            )
        },
        "/api/streams/{stream}/groups": {"get": _op("the stream's groups", [_STREAM])},
        _G: {"get": _op("a group: kind, configuration, members, lag, health", [_STREAM, _GROUP])},
        _G + "/lag": {"get": _op("lag per partition", [_STREAM, _GROUP])},
        _G + "/health": {"get": _op("health per partition, with reasons", [_STREAM, _GROUP])},
        _G + "/reset": {"post": _op("move an ordered group without members", [_STREAM, _GROUP], _RESET)},
        _G + "/dead-letters": {
            "get": _op(
                "pending dead letters, oldest first",
                [
                    _STREAM,
                    _GROUP,
                    _query("error_type", "string", "only this error type"),
                    _query("contains", "string", "only errors whose message contains this"),
                    _query("since", "number", "stored at or after"),
                    _query("until", "number", "stored before"),
                    _LIMIT,
                ],
            )
        },
        _G + "/dead-letters/{id}": {
            "get": _op(
                "one dead letter",
                [
                    _STREAM,
                    _GROUP,
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
            )
        },
        _G + "/dead-letters/redrive": {
            "post": _op("send letters back to their subjects", [_STREAM, _GROUP], _SELECTION)
        },
        _G + "/dead-letters/purge": {
            "post": _op("drop letters (confirm: true)", [_STREAM, _GROUP], _SELECTION)
        },
    },
}
