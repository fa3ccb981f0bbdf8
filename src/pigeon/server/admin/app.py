"""The ``/api/`` routes: streams, groups, messages, dead letters, health (docs/admin-api.md).

Handlers work on the server's engine. Stream creation and deletion go through `PigeonApi`,
so JetStream clients and ``$PIGEON.API`` members see the same streams; dead letters go through
`pigeon.patterns.deadletters.DeadLetters` over an embedded transport that wraps the server's
engine (never closed here: the server owns the engine).
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ...engine import Engine, OrderedGroup, StartAt, StreamConfig
from ...message import Message
from ...patterns.deadletters import DeadLetter, DeadLetters
from ...transport.embedded import EmbeddedOptions, EmbeddedTransport
from ..metrics import Observer
from ..nats import NatsServer
from ..pigeon_api import PigeonApi
from .errors import ApiProblem, field, from_error, json_body, problem, query_float, query_int
from .openapi import OPENAPI

__all__ = ["AdminConfig", "admin_routes"]

_Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class AdminConfig:
    token: str | None = None  # when set, every /api/ call needs "Authorization: Bearer <token>"


def payload_json(payload: bytes) -> dict[str, Any]:
    """A payload for people: JSON when it parses, text when it is UTF-8, else base64."""
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return {"encoding": "base64", "payload": base64.b64encode(payload).decode()}
    try:
        return {"encoding": "json", "payload": json.loads(text)}
    except ValueError:
        return {"encoding": "text", "payload": text}


def message_json(message: Message) -> dict[str, Any]:
    return {
        "partition": message.partition,
        "offset": message.offset,
        "subject": message.subject,
        "key": message.key,
        "id": message.id,
        "timestamp": message.timestamp,
        "headers": dict(message.headers),
        **payload_json(message.payload),
    }


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {**letter.summary(), "message": message_json(letter.message)}


class _Admin:
    def __init__(self, engine: Engine, nats: NatsServer, api: PigeonApi, observer: Observer) -> None:
        self.engine = engine
        self.nats = nats
        self.api = api
        self.observer = observer
        self.transport = EmbeddedTransport(engine, EmbeddedOptions())

    # -- health ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        groups = []
        for stream in self.engine.streams():
            for group in self.engine.groups(stream):
                status = self.observer.health(stream, group).status
                groups.append({"stream": stream, "group": group, "status": status.name})
        worst = max((g["status"] != "OK" for g in groups), default=False)
        return JSONResponse({"status": "degraded" if worst else "ok", "groups": groups})

    async def ready(self, request: Request) -> Response:
        try:
            self.engine.streams()
            port = self.nats.port
        except Exception as error:  # not open or not listening: not ready, whatever the reason
            return problem(503, "not_ready", str(error))
        return JSONResponse({"ready": True, "nats_port": port})

    # -- streams -----------------------------------------------------------------------------

    def _stream(self, name: str) -> dict[str, Any]:
        info = self.engine.stream_info(name)
        config = info.config.to_json()
        config.pop("metadata", None)
        return {
            "name": name,
            "config": config,
            "messages": info.messages,
            "bytes": info.bytes,
            "groups": self.engine.groups(name),
            "partitions": [asdict(p) for p in info.partitions],
        }

    async def streams(self, request: Request) -> Response:
        return JSONResponse({"streams": [self._stream(name) for name in self.engine.streams()]})

    async def stream(self, request: Request) -> Response:
        return JSONResponse(self._stream(request.path_params["stream"]))

    async def create_stream(self, request: Request) -> Response:
        body = await json_body(request)
        subjects = field(body, "subjects", list)
        if not subjects or not all(isinstance(s, str) for s in subjects):
            raise ApiProblem(422, "wrong_type", "'subjects' must be a non-empty list of subject patterns")
        limits = {}
        for name, kind in (
            ("max_age_s", (int, float)),
            ("max_msgs", int),
            ("max_bytes", int),
            ("dedup_window_s", (int, float)),
        ):
            value = field(body, name, kind, required=False)
            if value is not None:
                limits[name] = value
        config = StreamConfig(
            name=field(body, "name", str),
            subjects=tuple(subjects),
            partitions=field(body, "partitions", int, required=False) or 1,
            **limits,
        )
        await self.api.create_stream(config)
        return JSONResponse(self._stream(config.name), status_code=201)

    async def delete_stream(self, request: Request) -> Response:
        await self.api.delete_stream(request.path_params["stream"])
        return JSONResponse({"deleted": request.path_params["stream"]})

    async def purge_stream(self, request: Request) -> Response:
        name = request.path_params["stream"]
        await self.engine.purge_stream(name)
        return JSONResponse(self._stream(name))

    # -- messages ----------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        stream = request.path_params["stream"]
        partition = query_int(request, "partition", 0) or 0
        limit = min(query_int(request, "limit", 50, minimum=1) or 50, 1000)
        since = query_float(request, "since")
        offset = query_int(request, "offset", None)
        if since is not None and offset is not None:
            raise ApiProblem(400, "invalid_parameter", "give offset or since, not both")
        start = StartAt.time(since) if since is not None else StartAt.offset(offset or 0)
        first = self.engine.resolve(stream, partition, start)
        found = self.engine.fetch(stream, partition, first, limit + 1)
        more = len(found) > limit
        page = found[:limit]
        return JSONResponse(
            {
                "stream": stream,
                "partition": partition,
                "messages": [message_json(m) for m in page],
                "next_offset": (page[-1].offset or 0) + 1 if more else None,
            }
        )

    async def message(self, request: Request) -> Response:
        stream = request.path_params["stream"]
        partition, offset = request.path_params["partition"], request.path_params["offset"]
        found = self.engine.fetch(stream, partition, offset, 1)
        if not found or found[0].offset != offset:
            raise ApiProblem(404, "message_not_found", f"no message at {stream}[{partition}]@{offset}")
        return JSONResponse(message_json(found[0]))

    # -- groups ------------------------------------------------------------------------------

    async def groups(self, request: Request) -> Response:
        stream = request.path_params["stream"]
        return JSONResponse({"groups": [self._group(stream, g) for g in self.engine.groups(stream)]})

    def _group(self, stream: str, name: str) -> dict[str, Any]:
        group = self.engine.group(stream, name)
        config = asdict(group.config)
        ordered = isinstance(group, OrderedGroup)
        if isinstance(group, OrderedGroup):
            members = [asdict(m) for m in group.members()]
        else:
            members = [{"name": n} for n in group.member_names()]
        lags = self.engine.group_lag(stream, name)
        return {
            "stream": stream,
            "group": name,
            "kind": "ordered" if ordered else "shared",
            "config": json.loads(json.dumps(config, default=str)),
            "members": members,
            "lag": sum(p.lag for p in lags),
            "partitions": [asdict(p) for p in lags],
            "health": self._health(stream, name),
        }

    def _health(self, stream: str, name: str) -> dict[str, Any]:
        health = self.observer.health(stream, name)
        return {
            "status": health.status.name,
            "complete": health.complete,
            "partitions": [{**asdict(p), "status": p.status.name} for p in health.partitions],
        }

    async def group(self, request: Request) -> Response:
        return JSONResponse(self._group(request.path_params["stream"], request.path_params["group"]))

    async def lag(self, request: Request) -> Response:
        lags = self.engine.group_lag(request.path_params["stream"], request.path_params["group"])
        return JSONResponse({"partitions": [asdict(p) for p in lags]})

    async def group_health(self, request: Request) -> Response:
        stream, name = request.path_params["stream"], request.path_params["group"]
        self.engine.group(stream, name)
        return JSONResponse(self._health(stream, name))

    async def reset(self, request: Request) -> Response:
        stream, name = request.path_params["stream"], request.path_params["group"]
        body = await json_body(request)
        to = field(body, "to", str)
        if to in ("earliest", "latest"):
            start = StartAt(to)
        elif to == "offset":
            start = StartAt.offset(field(body, "value", int))
        elif to == "time":
            start = StartAt.time(field(body, "value", (int, float)))
        else:
            raise ApiProblem(422, "invalid_field", "'to' must be earliest, latest, offset or time")
        await self.engine.reset_group_offsets(stream, name, start)
        return JSONResponse(self._group(stream, name))

    # -- dead letters ------------------------------------------------------------------------

    def _letters(self, request: Request) -> DeadLetters:
        stream, name = request.path_params["stream"], request.path_params["group"]
        self.engine.group(stream, name)
        return DeadLetters(self.transport, stream, name)

    async def dead_letters(self, request: Request) -> Response:
        limit = min(query_int(request, "limit", 100, minimum=1) or 100, 10_000)
        error_type = request.query_params.get("error_type")
        contains = request.query_params.get("contains")
        since, until = query_float(request, "since"), query_float(request, "until")
        box = self._letters(request)
        letters = await box.list(10_000)
        chosen = [
            letter
            for letter in letters
            if (error_type is None or letter.error_type == error_type)
            and (contains is None or contains in letter.error_message)
            and (since is None or letter.message.timestamp >= since)
            and (until is None or letter.message.timestamp < until)
        ]
        return JSONResponse({"total": len(letters), "dead_letters": [letter_json(x) for x in chosen[:limit]]})

    async def dead_letter(self, request: Request) -> Response:
        wanted = request.path_params["id"]
        for letter in await self._letters(request).list(10_000):
            if letter.id == wanted:
                return JSONResponse(letter_json(letter))
        raise ApiProblem(404, "dead_letter_not_found", f"no pending dead letter {wanted!r}")

    def _selection(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("all") is True:
            return {"all": True}
        ids = field(body, "ids", list)
        if not ids or not all(isinstance(i, str) for i in ids):
            raise ApiProblem(
                422, "wrong_type", "'ids' must be a non-empty list of dead-letter ids, or all: true"
            )
        return {"ids": ids}

    async def redrive(self, request: Request) -> Response:
        selection = self._selection(await json_body(request))
        redriven = await self._letters(request).redrive(**selection)
        return JSONResponse({"redriven": redriven})

    async def purge(self, request: Request) -> Response:
        body = await json_body(request)
        if body.get("confirm") is not True:
            raise ApiProblem(422, "confirmation_required", 'purging dead letters needs "confirm": true')
        purged = await self._letters(request).purge(**self._selection(body))
        return JSONResponse({"purged": purged})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)


def admin_routes(
    engine: Engine, nats: NatsServer, api: PigeonApi, observer: Observer, config: AdminConfig
) -> list[BaseRoute]:
    admin = _Admin(engine, nats, api, observer)

    def guarded(handler: _Handler) -> _Handler:
        async def run(request: Request) -> Response:
            if config.token is not None and not _authorized(request, config.token):
                return problem(401, "unauthorized", "this API needs Authorization: Bearer <token>")
            try:
                return await handler(request)
            except Exception as error:
                return from_error(error)

        return run

    s, g, d = (
        "/api/streams/{stream}",
        "/api/streams/{stream}/groups/{group}",
        "/api/streams/{stream}/groups/{group}/dead-letters",
    )
    table: list[tuple[str, _Handler, list[str]]] = [
        ("/api/health", admin.health, ["GET"]),
        ("/api/ready", admin.ready, ["GET"]),
        ("/api/openapi.json", admin.openapi, ["GET"]),
        ("/api/streams", admin.streams, ["GET"]),
        ("/api/streams", admin.create_stream, ["POST"]),
        (s, admin.stream, ["GET"]),
        (s, admin.delete_stream, ["DELETE"]),
        (s + "/purge", admin.purge_stream, ["POST"]),
        (s + "/messages", admin.messages, ["GET"]),
        (s + "/messages/{partition:int}/{offset:int}", admin.message, ["GET"]),
        (s + "/groups", admin.groups, ["GET"]),
        (g, admin.group, ["GET"]),
        (g + "/lag", admin.lag, ["GET"]),
        (g + "/health", admin.group_health, ["GET"]),
        (g + "/reset", admin.reset, ["POST"]),
        (d, admin.dead_letters, ["GET"]),
        (d + "/redrive", admin.redrive, ["POST"]),
        (d + "/purge", admin.purge, ["POST"]),
        (d + "/{id}", admin.dead_letter, ["GET"]),
    ]
    return [Route(path, guarded(handler), methods=methods) for path, handler, methods in table]


def _authorized(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())
