"""``$PIGEON.API``: pigeon's own features over the NATS connection (docs/pigeon-api.md).

JetStream's API shows single-partition streams and shared groups only. This API serves the
whole engine: partitioned streams with keyed publishes, ordered and shared groups, dead
letters and lag per partition. pigeon's ``nats://`` transport uses it when it finds it.

Requests are handled one at a time, in arrival order, by one task (a client's publish is
stored before its next request is looked at); fetches that wait for messages run in their
own tasks. A group member belongs to the connection that joined it: when that connection
ends, the member leaves and its unsettled messages go to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, wire
from ..engine import (
    Delivery as Received,
)
from ..engine import (
    Engine,
    OrderedGroupConfig,
    OrderedMember,
    SharedGroupConfig,
    SharedMember,
    StreamConfig,
)
from ..engine.groups import ReportedError, dead_letter_stream
from ..errors import (
    AlreadySettledError,
    InvalidConfigError,
    InvalidMessageError,
    MemberNotFoundError,
    NoStreamForSubjectError,
    PigeonError,
)
from ..message import Message
from .jetstream import JetStream
from .nats import Delivery, NatsServer, Subscription
from .nats.connection import ClientConnection

__all__ = ["PigeonApi"]

log = logging.getLogger("pigeon.server.api")

KEY_HEADER = "Pigeon-Key"
MSG_ID_HEADER = "Nats-Msg-Id"
RECORDS_HEADER = b"NATS/1.0\r\nPigeon-Records: %d\r\n\r\n"
_STREAM_FIELDS = ("max_age_s", "max_msgs", "max_bytes", "dedup_window_s")
Json = dict[str, Any]


@dataclass
class _Remote:
    """A group member held for a client connection."""

    stream: str
    group: str
    member: OrderedMember | SharedMember
    conn: ClientConnection | None
    outstanding: dict[tuple[int, int], Received] = field(default_factory=dict)
    fetches: set[asyncio.Task[None]] = field(default_factory=set)


class PigeonApi:
    """``await PigeonApi.attach(server, engine, jetstream)``; ``close()`` to stop."""

    def __init__(self, server: NatsServer, engine: Engine, jetstream: JetStream) -> None:
        self.server = server
        self.engine = engine
        self.jetstream = jetstream
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._members: dict[str, _Remote] = {}
        self._tokens = 0
        self._worker: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None
        self._handlers: dict[str, Callable[[Json, Delivery], Awaitable[Any]]] = {
            "INFO": self._info,
            "STREAM.CREATE": self._stream_create,
            "STREAM.DELETE": self._stream_delete,
            "STREAM.STATE": self._stream_state,
            "STREAM.LIST": self._stream_list,
            "STREAM.PURGE": self._stream_purge,
            "PUB": self._publish,
            "GROUP.JOIN": self._join,
            "GROUP.LEAVE": self._leave,
            "GROUP.DELETE": self._group_delete,
            "GROUP.LAG": self._lag,
            "GROUP.DEAD_LETTERS": self._dead_letters,
            "ACK": self._settle,
        }

    @classmethod
    async def attach(cls, server: NatsServer, engine: Engine, jetstream: JetStream) -> PigeonApi:
        api = cls(server, engine, jetstream)
        api._subscription = server.subscribe(wire.API + ">", api._arrive)
        server.on_disconnect(api._disconnected)
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
        for token in list(self._members):
            await self._drop(token)
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    # -- dispatch --------------------------------------------------------------------------------

    def _arrive(self, delivery: Delivery) -> None:
        if delivery.reply:  # a request nobody waits for is not worth doing
            self._queue.put_nowait(delivery)

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            operation = delivery.subject[len(wire.API) :]
            if operation == "GROUP.FETCH":
                self._start_fetch(delivery)
                continue
            await self._answer(delivery, operation)

    async def _answer(self, delivery: Delivery, operation: str) -> None:
        assert delivery.reply is not None
        handler = self._handlers.get(operation)
        try:
            if handler is None:
                raise InvalidMessageError(f"unknown $PIGEON.API request {operation!r}")
            body = {} if operation == "PUB" else wire.decode(delivery.payload)
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
        return {"api": wire.PROTOCOL_VERSION, "server": "pigeon", "version": __version__}

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
        for token, remote in list(self._members.items()):
            if remote.stream == name:
                await self._drop(token)
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
        """Store each message of the request in its stream, then hand it to core subscribers."""
        acks: list[Json | None] = []
        for record in wire.decode_records(delivery.payload):
            message = record.message
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
            if ack is None:
                acks.append(None)
            else:
                acks.append({"stream": ack.stream, "partition": ack.partition, "offset": ack.offset})
                if ack.duplicate:
                    acks[-1]["duplicate"] = True  # type: ignore[index]
                    continue
            self._route_to_clients(message, msg_id)
        return {"acks": acks}

    def _route_to_clients(self, message: Message, msg_id: str | None) -> None:
        headers = dict(message.headers) if message.headers else {}
        if message.key is not None:
            headers[KEY_HEADER] = message.key
        if msg_id is not None:
            headers[MSG_ID_HEADER] = msg_id
        block = None
        if headers:
            lines = "".join(
                f"{name}: {wire.to_header_value(value, name)}\r\n" for name, value in headers.items()
            )
            block = f"NATS/1.0\r\n{lines}\r\n".encode()
        self.server.publish(message.subject, message.payload, headers=block, clients_only=True)

    # -- groups ----------------------------------------------------------------------------------

    async def _join(self, body: Json, delivery: Delivery) -> Json:
        stream, spec, name = body["stream"], body["spec"], body.get("member")
        for token, remote in list(self._members.items()):
            # A client back after a reconnect takes its member over from the dead connection.
            if (remote.stream, remote.group, remote.member.name) == (stream, spec["group"], name):
                await self._drop(token)
        member: OrderedMember | SharedMember
        start = wire.start_from_json(spec.get("start"))
        if spec.get("kind", "shared") == "ordered":
            ordered = await self.engine.ordered_group(
                stream,
                OrderedGroupConfig(
                    spec["group"],
                    start=start,
                    max_deliver=spec.get("max_deliver"),
                    backoff=wire.backoff_from_json(spec.get("backoff")),
                    dead_letter=spec.get("dead_letter", True),
                ),
            )
            member = await ordered.join(name)
        elif spec.get("kind", "shared") == "shared":
            shared = await self.engine.shared_group(
                stream,
                SharedGroupConfig(
                    spec["group"],
                    start=start,
                    ack_wait_s=spec.get("ack_wait_s", 30.0),
                    max_deliver=spec.get("max_deliver"),
                    backoff=wire.backoff_from_json(spec.get("backoff")),
                    max_ack_pending=spec.get("max_ack_pending", 1000),
                    key_ordered=spec.get("key_ordered", False),
                    dead_letter=spec.get("dead_letter", True),
                ),
            )
            member = shared.member(name)
        else:
            raise InvalidConfigError(f"group kind must be 'ordered' or 'shared', not {spec.get('kind')!r}")
        self._tokens += 1
        token = f"m{self._tokens}"
        self._members[token] = _Remote(stream, spec["group"], member, delivery.origin)
        return {"member": token}

    def _remote(self, body: Json) -> _Remote:
        remote = self._members.get(body.get("member", ""))
        if remote is None:
            raise MemberNotFoundError(f"no member {body.get('member')!r}: it left, or the server restarted")
        return remote

    async def _leave(self, body: Json, delivery: Delivery) -> Json:
        if body.get("member") in self._members:
            await self._drop(body["member"])
        return {}

    async def _drop(self, token: str) -> None:
        remote = self._members.pop(token, None)
        if remote is None:
            return
        for task in list(remote.fetches):
            task.cancel()
        with contextlib.suppress(PigeonError):
            await remote.member.leave()

    def _disconnected(self, conn: ClientConnection) -> None:
        for token in [t for t, remote in self._members.items() if remote.conn is conn]:
            task = asyncio.get_running_loop().create_task(self._drop(token))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _group_delete(self, body: Json, delivery: Delivery) -> Json:
        stream, group = body["stream"], body["group"]
        for token, remote in list(self._members.items()):
            if (remote.stream, remote.group) == (stream, group):
                await self._drop(token)
        self.jetstream.group_removed(stream, group)
        await self.engine.delete_group(stream, group)
        return {}

    async def _lag(self, body: Json, delivery: Delivery) -> Json:
        lags = self.engine.group_lag(body["stream"], body["group"])
        return {"partitions": [wire.lag_to_json(lag) for lag in lags]}

    async def _dead_letters(self, body: Json, delivery: Delivery) -> tuple[bytes, bytes]:
        config = self.engine.stream_info(body["stream"]).config
        name = dead_letter_stream(config, body["group"]).name
        limit = int(body.get("max", 100))
        found: list[Message] = self.engine.fetch(name, 0, 0, limit) if name in self.engine.streams() else []
        return RECORDS_HEADER % len(found), wire.encode_records([wire.Record(m) for m in found])

    # -- fetching and settling ---------------------------------------------------------------

    def _start_fetch(self, delivery: Delivery) -> None:
        try:
            body = wire.decode(delivery.payload)
            remote = self._remote(body)
            batch, expires = int(body.get("batch", 100)), float(body.get("expires_s", 5.0))
            if batch < 1 or not 0 <= expires <= 3600:
                raise InvalidMessageError("a fetch needs batch >= 1 and expires_s within an hour")
        except (PigeonError, ValueError, TypeError) as error:
            if not isinstance(error, PigeonError):
                error = InvalidMessageError(f"bad GROUP.FETCH request: {error!r}")
            self.server.publish(delivery.reply or "", wire.encode(wire.error_to_json(error)))
            return
        task = asyncio.get_running_loop().create_task(self._fetch(remote, delivery, batch, expires))
        remote.fetches.add(task)
        task.add_done_callback(remote.fetches.discard)

    async def _fetch(self, remote: _Remote, delivery: Delivery, batch: int, expires: float) -> None:
        assert delivery.reply is not None
        try:
            received = await remote.member.fetch(batch, expires)
        except PigeonError as error:
            self.server.publish(delivery.reply, wire.encode(wire.error_to_json(error)))
            return
        # Deliveries settled elsewhere (a lease that moved, a partition revoked) are let go here.
        for where, old in list(remote.outstanding.items()):
            if old.settled or old.is_cancelled():
                del remote.outstanding[where]
        for r in received:
            remote.outstanding[(r.partition, r.offset)] = r
        records = [wire.Record(r.message, r.delivery_count) for r in received]
        self.server.publish(
            delivery.reply, wire.encode_records(records), headers=RECORDS_HEADER % len(records)
        )

    async def _settle(self, body: Json, delivery: Delivery) -> Json:
        remote = self._remote(body)
        where = (int(body["partition"]), int(body["offset"]))
        received = remote.outstanding.pop(where, None)
        if received is None:
            raise AlreadySettledError(f"{remote.stream}[{where[0]}]@{where[1]} is not held by this member")
        op = body.get("op")
        if op == "ack":
            await received.ack()
        elif op == "nack":
            await received.nack(body.get("delay"), error=_reported(body.get("error")))
        elif op == "term":
            await received.term(_reported(body.get("error")))
        elif op == "progress":
            remote.outstanding[where] = received
            await received.in_progress()
        else:
            remote.outstanding[where] = received
            raise InvalidMessageError(f"unknown settle op {op!r}: use ack, nack, term or progress")
        return {}


def _reported(error: Any) -> ReportedError | None:
    """The handler error a client sent with a nack or term, as the engine records it."""
    if error is None:
        return None
    if not isinstance(error, dict):
        raise InvalidMessageError(f"error must be an object with type and message, not {error!r}")
    return ReportedError(str(error.get("type") or "Error"), str(error.get("message", "")))
