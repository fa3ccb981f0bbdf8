"""Group members that ``$PIGEON.API`` holds for client connections: join, fetch, settle, leave.

A member belongs to the connection that joined it: when that connection ends, the member
leaves and its unsettled messages go to the others. The engine's deliveries a member holds
are kept here by partition and offset, which is how a client names one when it settles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from ... import wire
from ...engine import Delivery as Received
from ...engine import Engine, OrderedGroupConfig, OrderedMember, SharedGroupConfig, SharedMember
from ...engine.groups import ReportedError
from ...errors import (
    AlreadySettledError,
    InvalidConfigError,
    InvalidMessageError,
    MemberNotFoundError,
    PigeonError,
)
from ..jetstream import JetStream
from ..nats import Delivery, NatsServer
from ..nats.connection import ClientConnection

Json = dict[str, Any]
RECORDS_HEADER = b"NATS/1.0\r\nPigeon-Records: %d\r\n\r\n"


@dataclass
class _Remote:
    """A group member held for a client connection."""

    stream: str
    group: str
    member: OrderedMember | SharedMember
    conn: ClientConnection | None
    outstanding: dict[tuple[int, int], Received] = field(default_factory=dict)
    fetches: dict[asyncio.Task[None], str] = field(default_factory=dict)  # task -> its reply subject


class Members:
    """The members joined through the API, by the token their client names them with."""

    def __init__(self, server: NatsServer, engine: Engine, jetstream: JetStream) -> None:
        self.server = server
        self.engine = engine
        self.jetstream = jetstream
        self._members: dict[str, _Remote] = {}
        self._tokens = 0
        # Tokens name this server's life too: after a restart a client still holding an old
        # token must be told its member is gone, never be handed another member that happens
        # to have the same number (it would fetch and ack that member's messages).
        self._life = secrets.token_hex(4)
        self._closing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for token in list(self._members):
            await self.drop(token)
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    async def drop_where(self, stream: str, group: str | None = None) -> None:
        """Let go of the members of a stream (of one of its groups) about to be deleted."""
        for token, remote in list(self._members.items()):
            if remote.stream == stream and group in (None, remote.group):
                gone = f"group {remote.group!r} of {stream!r} was deleted"
                await self.drop(token, waiting=MemberNotFoundError(gone))

    async def join(self, body: Json, delivery: Delivery) -> Json:
        stream, spec, name = body["stream"], body["spec"], body.get("member")
        if not isinstance(spec, dict):
            raise InvalidMessageError(f"GROUP.JOIN: spec must be an object, not {spec!r}")
        wire.check_fields(spec, wire.SPEC_FIELDS, "GROUP.JOIN spec")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidMessageError(f"GROUP.JOIN: member must be non-empty text, not {name!r}")
        for token, remote in list(self._members.items()):
            # A client back after a reconnect takes its member over from the dead connection.
            if (remote.stream, remote.group, remote.member.name) == (stream, spec["group"], name):
                await self.drop(token)
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
        token = f"m{self._tokens}.{self._life}"
        self._members[token] = _Remote(stream, spec["group"], member, delivery.origin)
        return {"member": token}

    def _remote(self, body: Json) -> _Remote:
        remote = self._members.get(body.get("member", ""))
        if remote is None:
            raise MemberNotFoundError(f"no member {body.get('member')!r}: it left, or the server restarted")
        return remote

    async def leave(self, body: Json, delivery: Delivery) -> Json:
        if body.get("member") in self._members:
            await self.drop(body["member"], waiting=True)
        return {}

    async def drop(self, token: str, waiting: PigeonError | bool = False) -> None:
        """Make a member leave. Its waiting fetches are answered with the error ``waiting``, or
        with no messages when it is True; when False (a gone client) nobody is there to answer."""
        remote = self._members.pop(token, None)
        if remote is None:
            return
        for task, reply in list(remote.fetches.items()):
            task.cancel()
            if isinstance(waiting, PigeonError):
                self.server.publish(reply, wire.encode(wire.error_to_json(waiting)))
            elif waiting:
                self.server.publish(reply, b"", headers=RECORDS_HEADER % 0)
        with contextlib.suppress(PigeonError):
            await remote.member.leave()

    def disconnected(self, conn: ClientConnection) -> None:
        for token in [t for t, remote in self._members.items() if remote.conn is conn]:
            task = asyncio.get_running_loop().create_task(self.drop(token))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def group_delete(self, body: Json, delivery: Delivery) -> Json:
        stream, group = body["stream"], body["group"]
        await self.drop_where(stream, group)
        self.jetstream.group_removed(stream, group)
        await self.engine.delete_group(stream, group)
        return {}

    def start_fetch(self, delivery: Delivery) -> None:
        try:
            body = wire.decode(delivery.payload)
            wire.check_fields(body, wire.REQUEST_FIELDS["GROUP.FETCH"], "GROUP.FETCH")
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
        remote.fetches[task] = delivery.reply or ""
        task.add_done_callback(lambda done: remote.fetches.pop(done, None))

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

    async def settle(self, body: Json, delivery: Delivery) -> Json:
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
