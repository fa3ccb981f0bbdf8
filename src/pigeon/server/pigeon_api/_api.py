"""Dispatch of ``$PIGEON.API`` requests, streams and publishes (docs/pigeon-api.md).

Requests are handled one at a time, in arrival order, by one task (a client's publish is
stored before its next request is looked at); fetches that wait for messages run in their
own tasks (see `_members`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ... import __version__, wire
from ...engine import Engine, StreamConfig
from ...engine.groups import dead_letter_stream
from ...errors import InvalidMessageError, NoStreamForSubjectError, PigeonError
from ...message import Message
from ..jetstream import JetStream
from ..nats import Delivery, NatsServer, Subscription
from ..nats.protocol import parse_headers
from ._members import RECORDS_HEADER, Members

__all__ = ["PigeonApi"]

log = logging.getLogger("pigeon.server.api")

_STREAM_FIELDS = ("max_age_s", "max_msgs", "max_bytes", "dedup_window_s")
Json = dict[str, Any]


class PigeonApi:
    """``await PigeonApi.attach(server, engine, jetstream)``; ``close()`` to stop."""

    def __init__(self, server: NatsServer, engine: Engine, jetstream: JetStream) -> None:
        self.server = server
        self.engine = engine
        self.jetstream = jetstream
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.members = Members(server, engine, jetstream)
        self._worker: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._handlers: dict[str, Callable[[Json, Delivery], Awaitable[Any]]] = {
            "INFO": self._info,
            "STREAM.CREATE": self._stream_create,
            "STREAM.DELETE": self._stream_delete,
            "STREAM.STATE": self._stream_state,
            "STREAM.LIST": self._stream_list,
            "STREAM.PURGE": self._stream_purge,
            "PUB": self._publish,
            "GROUP.JOIN": self.members.join,
            "GROUP.LEAVE": self.members.leave,
            "GROUP.DELETE": self.members.group_delete,
            "GROUP.LAG": self._lag,
            "GROUP.DEAD_LETTERS": self._dead_letters,
            "ACK": self.members.settle,
        }

    @classmethod
    async def attach(cls, server: NatsServer, engine: Engine, jetstream: JetStream) -> PigeonApi:
        api = cls(server, engine, jetstream)
        api._subscription = server.subscribe(wire.API + ">", api._arrive)
        server.on_disconnect(api.members.disconnected)
        api._worker = asyncio.get_running_loop().create_task(api._run())
        return api

    async def close(self) -> None:
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await self.members.close()

    # -- dispatch --------------------------------------------------------------------------------

    def _arrive(self, delivery: Delivery) -> None:
        if delivery.reply:  # a request nobody waits for is not worth doing
            self._queue.put_nowait(delivery)

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            operation = delivery.subject[len(wire.API) :]
            if operation == "GROUP.FETCH":
                self.members.start_fetch(delivery)
                continue
            await self._answer(delivery, operation)

    async def _answer(self, delivery: Delivery, operation: str) -> None:
        assert delivery.reply is not None
        handler = self._handlers.get(operation)
        try:
            if handler is None:
                raise InvalidMessageError(f"unknown $PIGEON.API request {operation!r}")
            body = {} if operation == "PUB" else wire.decode(delivery.payload)
            wire.check_fields(body, wire.REQUEST_FIELDS.get(operation, frozenset()), operation)
            answer = await handler(body, delivery)
        except (PigeonError, ValueError, TypeError, KeyError) as error:
            if not isinstance(error, PigeonError):
                error = InvalidMessageError(f"bad {operation} request: {error!r}")
            answer = wire.error_to_json(error)
        except Exception as error:  # a bug here must not stop the API for everyone
            log.exception("$PIGEON.API %s failed", operation)
            answer = wire.error_to_json(PigeonError(f"internal error: {error!r}"))
        if isinstance(answer, tuple):
            self.server.publish(delivery.reply, answer[1], headers=answer[0])
        else:
            self.server.publish(delivery.reply, wire.encode(answer))

    # -- streams ---------------------------------------------------------------------------------

    async def _info(self, body: Json, delivery: Delivery) -> Json:
        return {
            "api": wire.PROTOCOL_VERSION,
            "server": "pigeon",
            "version": __version__,
            "capabilities": list(wire.CAPABILITIES),
        }

    async def _stream_create(self, body: Json, delivery: Delivery) -> Json:
        limits = {name: body[name] for name in _STREAM_FIELDS if body.get(name) is not None}
        config = StreamConfig(
            name=body["name"],
            subjects=tuple(body["subjects"]),
            partitions=body.get("partitions", 1),
            **limits,
        )
        await self.create_stream(config)
        return {}

    async def create_stream(self, config: StreamConfig) -> None:
        """Create a stream in the engine, visible to JetStream clients when it can be."""
        info = await self.engine.create_stream(config)
        self.jetstream.stream_added(info.config)

    async def _stream_delete(self, body: Json, delivery: Delivery) -> Json:
        await self.delete_stream(body["name"])
        return {}

    async def delete_stream(self, name: str) -> None:
        """Delete a stream, its groups' members and their dead-letter streams, for every API."""
        config = self.engine.stream_info(name).config
        letters = [dead_letter_stream(config, group).name for group in self.engine.groups(name)]
        await self.members.drop_where(name)
        for doomed in [name, *letters]:
            if doomed in self.engine.streams():
                self.jetstream.stream_removed(doomed)
                await self.engine.delete_stream(doomed)

    async def _stream_state(self, body: Json, delivery: Delivery) -> Json:
        info = self.engine.stream_info(body["name"])
        return {
            "name": info.config.name,
            "subjects": list(info.config.subjects),
            "partitions": info.config.partitions,
            "messages": info.messages,
            "last_offsets": [p.next_offset - 1 for p in info.partitions],
        }

    async def _stream_list(self, body: Json, delivery: Delivery) -> Json:
        return {"streams": sorted(self.engine.streams())}

    async def _stream_purge(self, body: Json, delivery: Delivery) -> Json:
        await self.engine.purge_stream(body["name"])
        return {}

    async def _publish(self, body: Json, delivery: Delivery) -> Json:
        """Store each message of the request in its stream, then hand it to core subscribers.

        The payload is records; or, with a ``Pigeon-Subject`` header, it is one message (easy
        for any NATS client: its key and id in headers too), and so is the reply."""
        one = _header_message(delivery.headers) if delivery.headers else None
        if one is not None:
            message = Message(one[0], delivery.payload, key=one[1], headers=one[3] or None, id=one[2])
            ack = await self._store_and_route(message)
            return {"stored": False} if ack is None else {**ack, "duplicate": bool(ack.get("duplicate"))}
        try:
            records = wire.decode_records(delivery.payload)
        except InvalidMessageError as error:
            raise InvalidMessageError(
                f"a PUB payload is records, or one message with a {wire.SUBJECT_HEADER} header: {error}"
            ) from None
        return {"acks": [await self._store_and_route(record.message) for record in records]}

    async def _store_and_route(self, message: Message) -> Json | None:
        msg_id = message.id if message.has_explicit_id else None
        ack = None
        with contextlib.suppress(NoStreamForSubjectError):
            ack = await self.engine.publish(
                message.subject,
                message.payload,
                key=message.key,
                headers=message.headers or None,
                msg_id=msg_id,
            )
        answer: Json | None = None
        if ack is not None:
            answer = {"stream": ack.stream, "partition": ack.partition, "offset": ack.offset}
            if ack.duplicate:
                answer["duplicate"] = True
                return answer
        self._route_to_clients(message, msg_id)
        return answer

    def _route_to_clients(self, message: Message, msg_id: str | None) -> None:
        headers = dict(message.headers) if message.headers else {}
        if message.key is not None:
            headers[wire.KEY_HEADER] = message.key
        if msg_id is not None:
            headers[wire.MSG_ID_HEADER] = msg_id
        block = None
        if headers:
            lines = "".join(
                f"{name}: {wire.to_header_value(value, name)}\r\n" for name, value in headers.items()
            )
            block = f"NATS/1.0\r\n{lines}\r\n".encode()
        self.server.publish(message.subject, message.payload, headers=block, clients_only=True)

    # -- groups ----------------------------------------------------------------------------------

    async def _lag(self, body: Json, delivery: Delivery) -> Json:
        lags = self.engine.group_lag(body["stream"], body["group"])
        return {"partitions": [wire.lag_to_json(lag) for lag in lags]}

    async def _dead_letters(self, body: Json, delivery: Delivery) -> tuple[bytes, bytes]:
        config = self.engine.stream_info(body["stream"]).config
        name = dead_letter_stream(config, body["group"]).name
        limit = int(body.get("max", 100))
        found: list[Message] = self.engine.fetch(name, 0, 0, limit) if name in self.engine.streams() else []
        return RECORDS_HEADER % len(found), wire.encode_records([wire.Record(m) for m in found])


def _header_message(block: bytes) -> tuple[str, str | None, str | None, dict[str, str]] | None:
    """Subject, key, id and the other headers of a one-message PUB; None without Pigeon-Subject."""
    if wire.SUBJECT_HEADER.encode() not in block:
        return None
    subject = key = msg_id = None
    headers: dict[str, str] = {}
    for name, raw in parse_headers(block)[2]:
        value = wire.from_header_value(raw)
        if name == wire.SUBJECT_HEADER:
            subject = value
        elif name == wire.KEY_HEADER:
            key = value
        elif name == wire.MSG_ID_HEADER:
            msg_id = value or None
        else:
            headers[name] = value
    if not subject:
        raise InvalidMessageError(f"a PUB's {wire.SUBJECT_HEADER} header names no subject")
    return subject, key, msg_id, headers
