"""The ``nats://`` transport talking to ``pigeon serve``: streams and groups through ``$PIGEON.API``.

`NatsTransport.open` asks ``$PIGEON.API.INFO`` once connected; pigeon serve answers (a real
nats-server has no responder) and this subclass takes over. Core messaging stays plain NATS;
streams, publishes into them, groups, lag and dead letters are the engine's own, so nothing
is emulated: partitions, ordered groups and dead letters behave as on ``file://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import nats.errors
from nats.aio.msg import Msg

from ... import wire
from ...engine.groups.lag import PartitionLag
from ...engine.stream import PubAck
from ...errors import (
    InvalidConfigError,
    MemberNotFoundError,
    MessageTooLargeError,
    PigeonError,
    RequestTimeoutError,
    TransportClosedError,
)
from ...message import Message, new_id
from ..base import Capabilities, Consumer, ConsumerSpec, Received, StreamSpec, StreamState
from ..embedded import FULL
from ._codec import wire_headers
from ._transport import NatsTransport

# Messages of one batch publish sent in one request, and the bytes above which a request is cut.
_BATCH_MESSAGES = 1000
_BATCH_BYTES = 512 * 1024


async def serves_pigeon_api(transport: NatsTransport) -> bool:
    """True when the server answers ``$PIGEON.API.INFO`` (pigeon serve does; nats-server does not)."""
    try:
        reply = await transport.nc.request(
            wire.API + "INFO", b"", timeout=transport.options.request_timeout_s
        )
        return bool(json.loads(reply.data).get("server") == "pigeon")
    except (nats.errors.Error, ValueError, AttributeError, TimeoutError):
        return False


class PigeonServeTransport(NatsTransport):
    name = "nats"
    capabilities: ClassVar[Capabilities] = FULL
    emulation_notes: ClassVar[dict[str, str]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumers: set[PigeonConsumer] = set()

    async def close(self) -> None:
        if not self._closed:
            for consumer in list(self._consumers):
                with contextlib.suppress(Exception):
                    await consumer.close()
        await super().close()

    async def call(
        self, operation: str, body: Any = None, *, payload: bytes | None = None, timeout: float | None = None
    ) -> Msg:
        """One ``$PIGEON.API`` request; raises the pigeon exception the server reports."""
        self._check_open()
        data = payload if payload is not None else wire.encode(body or {})
        for attempt in (1, 2):
            await self._connected()
            reconnects = self.nc.stats["reconnects"]
            try:
                reply = await self.nc.request(
                    wire.API + operation, data, timeout=timeout or self.options.request_timeout_s
                )
                break
            except nats.errors.NoRespondersError:
                raise TransportClosedError("pigeon serve's $PIGEON.API does not answer") from None
            except nats.errors.TimeoutError:
                # A request written just before the connection broke is lost with it: send it
                # once more after the reconnect (publishes are at least once, as on any NATS).
                if attempt == 1 and (self.nc.stats["reconnects"] != reconnects or not self.nc.is_connected):
                    continue
                raise RequestTimeoutError(f"pigeon serve did not answer {operation} in time") from None
            except nats.errors.MaxPayloadError:
                raise MessageTooLargeError(
                    f"a {operation} request of {len(data)} bytes exceeds the server's limit"
                ) from None
            except nats.errors.ConnectionClosedError:
                raise TransportClosedError("the NATS connection is closed") from None
        if reply.headers and "Pigeon-Records" in reply.headers:
            return reply
        answer = wire.decode(reply.data)
        if "error" in answer:
            raise wire.error_from_json(answer["error"])
        return reply

    async def _connected(self) -> None:
        """Wait out a reconnect (a restarting server) rather than time a request out during it."""
        deadline = asyncio.get_running_loop().time() + self.options.connect_timeout_s
        while not self.nc.is_connected and not self.nc.is_closed:
            if asyncio.get_running_loop().time() > deadline:
                raise TransportClosedError("pigeon serve is not reachable: the connection is down")
            await asyncio.sleep(0.02)

    async def _json(self, operation: str, body: Any = None) -> dict[str, Any]:
        return wire.decode((await self.call(operation, body)).data)

    # -- publishing -------------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        self._check_publish(subject, payload, key)
        wire_headers(headers, key, msg_id, None)  # refuses what cannot travel, as on nats-server
        message = Message(subject, bytes(payload), key=key, headers=headers, id=msg_id)
        return (await self._publish_records([message]))[0]

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        for message in messages:
            self._check_publish(message.subject, message.payload, message.key)
            wire_headers(message.headers, message.key, None, None)
        acks: list[PubAck | None] = []
        chunk: list[Message] = []
        size = 0
        for message in messages:
            chunk.append(message)
            size += len(message.payload) + 200
            if len(chunk) >= _BATCH_MESSAGES or size >= _BATCH_BYTES:
                acks += await self._publish_records(chunk)
                chunk, size = [], 0
        if chunk:
            acks += await self._publish_records(chunk)
        return acks

    async def _publish_records(self, messages: list[Message]) -> list[PubAck | None]:
        answer = wire.decode(
            (await self.call("PUB", payload=wire.encode_records([wire.Record(m) for m in messages]))).data
        )
        return [
            None if a is None else PubAck(a["stream"], a["partition"], a["offset"], bool(a.get("duplicate")))
            for a in answer["acks"]
        ]

    # -- streams ------------------------------------------------------------------------------------

    async def create_stream(self, spec: StreamSpec) -> None:
        if not isinstance(spec, StreamSpec):
            raise InvalidConfigError(f"create_stream takes a StreamSpec, not {type(spec).__name__}")
        await self._json(
            "STREAM.CREATE",
            {
                "name": spec.name,
                "subjects": list(spec.subjects),
                "partitions": spec.partitions,
                "max_age_s": spec.max_age_s,
                "max_msgs": spec.max_msgs,
                "max_bytes": spec.max_bytes,
                "dedup_window_s": spec.dedup_window_s,
            },
        )

    async def delete_stream(self, name: str) -> None:
        await self._json("STREAM.DELETE", {"name": name})

    async def stream_state(self, name: str) -> StreamState:
        state = await self._json("STREAM.STATE", {"name": name})
        return StreamState(
            name=state["name"],
            subjects=tuple(state["subjects"]),
            partitions=state["partitions"],
            messages=state["messages"],
            last_offsets=tuple(state["last_offsets"]),
        )

    async def list_streams(self) -> list[str]:
        return list((await self._json("STREAM.LIST"))["streams"])

    async def purge_stream(self, name: str) -> None:
        await self._json("STREAM.PURGE", {"name": name})

    # -- groups -------------------------------------------------------------------------------------

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        if not isinstance(spec, ConsumerSpec):
            raise InvalidConfigError(f"consumer takes a ConsumerSpec, not {type(spec).__name__}")
        if member is not None and (not isinstance(member, str) or not member):
            raise InvalidConfigError(f"member must be non-empty text, not {member!r}")
        consumer = PigeonConsumer(self, stream, spec, member or f"{self.options.name}-{new_id()[-12:]}")
        await consumer.join()
        self._consumers.add(consumer)
        return consumer

    async def delete_group(self, stream: str, group: str) -> None:
        await self._json("GROUP.DELETE", {"stream": stream, "group": group})

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        answer = await self._json("GROUP.LAG", {"stream": stream, "group": group})
        return [wire.lag_from_json(lag) for lag in answer["partitions"]]

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        reply = await self.call("GROUP.DEAD_LETTERS", {"stream": stream, "group": group, "max": max_messages})
        return [record.message for record in wire.decode_records(reply.data)]


def _spec_json(spec: ConsumerSpec) -> dict[str, Any]:
    return {
        "group": spec.group,
        "kind": spec.kind,
        "start": wire.start_to_json(spec.start),
        "ack_wait_s": spec.ack_wait_s,
        "max_deliver": spec.max_deliver,
        "backoff": wire.backoff_to_json(spec.backoff),
        "max_ack_pending": spec.max_ack_pending,
        "key_ordered": spec.key_ordered,
        "dead_letter": spec.dead_letter,
    }


class PigeonConsumer(Consumer):
    """A member of a group held by pigeon serve for this connection."""

    def __init__(self, transport: PigeonServeTransport, stream: str, spec: ConsumerSpec, name: str) -> None:
        self.transport = transport
        self.stream = stream
        self.spec = spec
        self.name = name
        self.token = ""
        self._closed = False

    async def join(self) -> None:
        answer = await self.transport._json(
            "GROUP.JOIN", {"stream": self.stream, "spec": _spec_json(self.spec), "member": self.name}
        )
        self.token = answer["member"]

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise InvalidConfigError(f"timeout must be a non-negative number of seconds, not {timeout!r}")
        if self._closed:
            raise MemberNotFoundError(f"member {self.name!r} has left the group")
        try:
            reply = await self._fetch(max_messages, timeout)
        except (MemberNotFoundError, TransportClosedError, RequestTimeoutError):
            # The server restarted or the connection was replaced: join again, as the same member.
            if self._closed or self.transport._closed:
                raise
            await asyncio.sleep(0.05)
            try:
                await self.join()
            except (TransportClosedError, RequestTimeoutError):
                return []
            reply = await self._fetch(max_messages, timeout)
        token = self.token
        return [
            RemoteReceived(self, token, r.message, r.delivery_count) for r in wire.decode_records(reply.data)
        ]

    async def _fetch(self, max_messages: int, timeout: float) -> Msg:
        body = {"member": self.token, "batch": max_messages, "expires_s": timeout}
        return await self.transport.call(
            "GROUP.FETCH", body, timeout=timeout + self.transport.options.request_timeout_s
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport._consumers.discard(self)
        with contextlib.suppress(PigeonError):
            await self.transport._json("GROUP.LEAVE", {"member": self.token})


def _error(error: BaseException | str | None) -> dict[str, str] | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": "Error", "message": str(error)}


class RemoteReceived:
    """A delivery to a remote member; settling it is a request to the server."""

    __slots__ = ("_consumer", "_token", "delivery_count", "message")

    def __init__(self, consumer: PigeonConsumer, token: str, message: Message, delivery_count: int) -> None:
        self._consumer = consumer
        self._token = token
        self.message = message
        self.delivery_count = delivery_count

    @property
    def partition(self) -> int:
        assert self.message.partition is not None
        return self.message.partition

    @property
    def offset(self) -> int:
        assert self.message.offset is not None
        return self.message.offset

    async def _settle(self, op: str, **extra: Any) -> None:
        body = {"member": self._token, "partition": self.partition, "offset": self.offset, "op": op, **extra}
        await self._consumer.transport._json("ACK", body)

    async def ack(self) -> None:
        await self._settle("ack")

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._settle("nack", delay=delay, error=_error(error))

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._settle("term", error=_error(reason))

    async def in_progress(self) -> None:
        await self._settle("progress")

    def __repr__(self) -> str:
        return f"<RemoteReceived {self.message!r} delivery {self.delivery_count}>"


__all__ = ["PigeonServeTransport", "serves_pigeon_api"]
