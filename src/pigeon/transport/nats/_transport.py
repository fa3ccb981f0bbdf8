"""`NatsTransport`: connection, publishing, core messaging, streams, groups, lag and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from ...engine.config import validate_name
from ...engine.groups.deadletter import Failures, dead_letter_message
from ...engine.murmur2 import partition_for_key
from ...engine.stream import PubAck
from ...errors import (
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidSubjectError,
    MessageTooLargeError,
    NoRespondersError,
    PigeonError,
    RequestTimeoutError,
    StreamExistsError,
    StreamNotFoundError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from ...message import Headers, Message, new_id
from ...subjects import SubjectIndex, validate_pattern, validate_subject
from ..base import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    PartitionLag,
    StreamSpec,
    StreamState,
    Subscription,
    Transport,
)
from ._codec import SEALED, STREAM_NAME_IN_USE, api_error, read_message, wire_headers
from ._core import NatsSubscription
from ._groups import FailureNotes, GroupContext, Member, SharedMember, spec_json
from ._options import (
    ACK_INBOX_ROOT,
    COORDINATION_ROOT,
    GROUP_DESCRIPTION,
    PARTITION_ROOT,
    STREAM_DESCRIPTION,
    Layout,
    NatsOptions,
    coordination_bucket,
    dead_letter_stream_name,
    dead_letter_subject,
)
from ._ordered import OrderedMember

log = logging.getLogger("pigeon.transport.nats")

_PIPELINE = 512  # stored publishes of one batch in flight at once
_RESERVED_ROOTS = (f"{PARTITION_ROOT}.", f"{COORDINATION_ROOT}.", f"{ACK_INBOX_ROOT}.")


class _NoStream:
    """The answer to a stored publish that no stream took (no responders)."""


_NO_STREAM = _NoStream()


@contextlib.contextmanager
def _jetstream(what: str) -> Iterator[None]:
    """Turn client exceptions into pigeon's."""
    try:
        yield
    except ServiceUnavailableError:
        raise UnsupportedFeatureError(
            "nats", f"{what} without JetStream", "start nats-server with JetStream enabled (-js)"
        ) from None
    except APIError as error:
        raise api_error(error, what) from None
    except nats.errors.ConnectionClosedError:
        raise TransportClosedError(f"{what}: the NATS connection is closed") from None


class NatsTransport(Transport):
    name = "nats"
    capabilities: ClassVar[Capabilities] = Capabilities(
        durable=True,
        wildcards=True,
        queue_groups=True,
        request_reply=True,
        no_responders=True,
        partitions=True,
        ordered_groups=True,
        shared_groups=True,
        per_key_order=True,
        delayed_nack=True,
        ack_timeout=True,
        in_progress=True,
        max_deliver=True,
        dead_letters=True,
        dedup=True,
        replay_offset=True,
        replay_time=True,
        lag=True,
        emulated=frozenset({"partitions", "ordered_groups", "per_key_order", "dead_letters"}),
    )
    emulation_notes: ClassVar[dict[str, str]] = {
        "partitions": (
            "one JetStream stream per partition (`<stream>~<p>`, capturing `$PGN.<stream>.<p>.>`); "
            "pigeon publishes the stored copy there and a core copy to the subject, which a sealed "
            "stream named like the pigeon stream captures (and drops) to reserve its subjects"
        ),
        "ordered_groups": (
            "a durable pull consumer per partition; ownership of partitions in a KV bucket with a "
            "TTL (session timeout), heartbeats and revision-checked updates; acks only for the "
            "settled prefix of a batch, nacks rewind by nak'ing the rest in offset order"
        ),
        "per_key_order": "through ordered groups (key-ordered shared groups are refused)",
        "dead_letters": (
            "on term, or a nack of the max_deliver-th delivery, pigeon publishes the dead letter "
            "to `<stream>-<group>-dlq` (Nats-Msg-Id for idempotence), then terms the original"
        ),
    }

    def __init__(self, nc: Client, options: NatsOptions) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=options.request_timeout_s)
        self.options = options
        self.failures = FailureNotes()
        self._closed = False
        self._routes: SubjectIndex[Layout] = SubjectIndex()
        self._routes_until = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._layouts: dict[str, tuple[float, Layout]] = {}
        self._round_robin: dict[str, int] = {}
        self._ack_prefix = f"{ACK_INBOX_ROOT}.{nc.new_inbox().rsplit('.', 1)[-1]}."
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_numbers = itertools.count()
        self._subscriptions: set[NatsSubscription] = set()
        self._members: set[Member] = set()
        self._dead_letter_streams: set[str] = set()

    @classmethod
    async def open(cls, url: str, options: Any = None) -> NatsTransport:
        if options is None:
            options = NatsOptions()
        elif not isinstance(options, NatsOptions):
            raise InvalidConfigError(f"options must be a NatsOptions, not {type(options).__name__}")

        async def on_error(error: Exception) -> None:
            log.warning("NATS connection error: %r", error)

        try:
            nc = await nats.connect(
                servers=[url],
                name=options.name,
                connect_timeout=options.connect_timeout_s,
                max_reconnect_attempts=-1,
                error_cb=on_error,
                user_credentials=options.user_credentials,
                tls=options.tls,
            )
        except (nats.errors.Error, OSError, ValueError) as error:
            raise TransportClosedError(f"cannot connect to NATS at {url!r}: {error!r}") from None
        transport = cls(nc, options)
        await nc.subscribe(f"{transport._ack_prefix}*", cb=transport._on_ack)
        return transport

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for member in list(self._members):
            with contextlib.suppress(Exception):
                await member.close()
        for subscription in list(self._subscriptions):
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        for future in self._acks.values():
            if not future.done():
                future.cancel()
        self._acks.clear()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=max(1, int(self.options.request_timeout_s)))
        with contextlib.suppress(Exception):
            await self.nc.close()

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise TransportClosedError("the NATS transport is closed")

    def forget_member(self, member: Member) -> None:
        self._members.discard(member)

    # -- publishing -------------------------------------------------------------------------------

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _send_stored(
        self, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> tuple[str, asyncio.Future[Msg]]:
        """Publish with our acknowledgement inbox as the reply; the future gets JetStream's answer."""
        token = str(next(self._ack_numbers))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        try:
            await self.nc.publish(subject, payload, reply=self._ack_prefix + token, headers=headers)
        except BaseException:
            self._acks.pop(token, None)
            raise
        return token, future

    async def _stored_answer(self, token: str, future: asyncio.Future[Msg]) -> PubAck | _NoStream:
        try:
            async with asyncio.timeout(self.options.request_timeout_s):
                msg = await future
        except TimeoutError:
            self._acks.pop(token, None)
            raise
        if msg.headers and msg.headers.get("Status") == "503":
            return _NO_STREAM
        answer = json.loads(msg.data)
        error = answer.get("error")
        if error:
            raise APIError(
                code=error.get("code"), err_code=error.get("err_code"), description=error.get("description")
            )
        return PubAck(answer["stream"], 0, answer["seq"] - 1, bool(answer.get("duplicate")))

    async def _core(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        try:
            await self.nc.publish(subject, payload, headers=headers)
        except nats.errors.MaxPayloadError:
            raise MessageTooLargeError(
                f"a message of {len(payload)} bytes exceeds the server's limit of {self.nc.max_payload}"
            ) from None
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None

    def _check_publish(self, subject: str, payload: object, key: object) -> None:
        self._check_open()
        validate_subject(subject)
        if subject.startswith(_RESERVED_ROOTS):
            raise InvalidSubjectError(f"subject {subject!r}: subjects under $PGN and $PGNC are pigeon's own")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
        if key is not None and not isinstance(key, str):
            raise InvalidMessageError(f"key must be text, not {type(key).__name__}")

    def _partition(self, layout: Layout, key: str | None, msg_id: str | None) -> int:
        if layout.partitions == 1:
            return 0
        if key is not None:
            return partition_for_key(key.encode(errors="surrogatepass"), layout.partitions)
        if msg_id is not None:
            # A retried publish must land where its first copy did, so that dedup sees it.
            return partition_for_key(msg_id.encode(errors="surrogatepass"), layout.partitions)
        turn = self._round_robin.get(layout.name)
        if turn is None:
            turn = random.randrange(layout.partitions)
        self._round_robin[layout.name] = turn + 1
        return turn % layout.partitions

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
        layout = await self._route(subject)
        if layout is None:
            await self._core(subject, bytes(payload), wire_headers(headers, key, msg_id, None))
            return None
        return await self._publish_stored(layout, subject, bytes(payload), key, headers, msg_id)

    async def _publish_stored(
        self,
        layout: Layout | None,
        subject: str,
        payload: bytes,
        key: str | None,
        headers: Mapping[str, str] | None,
        msg_id: str | None,
    ) -> PubAck | None:
        wire = wire_headers(headers, key, msg_id, None if msg_id is not None else new_id())
        core_sent = False  # a publish to a stream's own subject reaches core subscribers as well
        for attempt in range(2):
            if layout is None:
                if not core_sent:
                    await self._core(subject, payload, wire)
                return None
            p = self._partition(layout, key, msg_id)
            target = subject if layout.partitions == 1 else layout.prefixes[p] + subject
            try:
                token, future = await self._send_stored(target, payload, wire)
            except nats.errors.MaxPayloadError:
                raise MessageTooLargeError(
                    f"a message of {len(payload)} bytes exceeds the server's limit of {self.nc.max_payload}"
                ) from None
            core_sent = core_sent or layout.partitions == 1
            try:
                with _jetstream(f"publish to {subject!r}"):
                    try:
                        answer = await self._stored_answer(token, future)
                    except APIError as error:
                        if error.err_code != SEALED or attempt:
                            raise
                        answer = _NO_STREAM  # a partitioned stream's subject now: route again
            except TimeoutError:
                self._forget_routes()
                if await self._route(subject) is None:
                    return None  # the stream is gone; core subscribers got the message
                raise TimeoutError(
                    f"publish to {subject!r}: no acknowledgement from stream {layout.name!r} within "
                    f"{self.options.request_timeout_s}s (it may or may not be stored)"
                ) from None
            if isinstance(answer, _NoStream):
                self._forget_routes()
                layout = await self._route(subject)
                continue
            if layout.partitions > 1:
                if not answer.duplicate:
                    await self._core(subject, payload, wire)
                return PubAck(layout.name, p, answer.offset, answer.duplicate)
            return answer
        raise PigeonError(f"publish to {subject!r}: the streams capturing it keep changing; try again")

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        """Publish in order, with up to 512 stored publishes awaiting their acknowledgement at
        once. A message whose stream changed meanwhile is published again on its own (so it may
        land after later ones)."""
        results: list[PubAck | None] = []
        for start in range(0, len(messages), _PIPELINE):
            results += await self._publish_window(messages[start : start + _PIPELINE])
        return results

    async def _publish_window(self, messages: Sequence[Message]) -> list[PubAck | None]:
        sent: list[tuple[Message, Layout, int, dict[str, str] | None, str, asyncio.Future[Msg]] | None] = []
        for m in messages:
            if not isinstance(m, Message):
                raise InvalidMessageError(f"publish_batch takes Messages, not {type(m).__name__}")
            self._check_publish(m.subject, m.payload, m.key)
            msg_id = m.id if m.has_explicit_id else None
            layout = await self._route(m.subject)
            if layout is None:
                await self._core(m.subject, bytes(m.payload), wire_headers(m.headers, m.key, msg_id, None))
                sent.append(None)
                continue
            wire = wire_headers(m.headers, m.key, msg_id, None if msg_id is not None else new_id())
            p = self._partition(layout, m.key, msg_id)
            target = m.subject if layout.partitions == 1 else layout.prefixes[p] + m.subject
            try:
                token, future = await self._send_stored(target, bytes(m.payload), wire)
            except nats.errors.MaxPayloadError:
                raise MessageTooLargeError(
                    f"a message of {len(m.payload)} bytes exceeds the server's limit"
                ) from None
            sent.append((m, layout, p, wire, token, future))
        results: list[PubAck | None] = []
        for item in sent:
            if item is None:
                results.append(None)
                continue
            m, layout, p, wire, token, future = item
            try:
                with _jetstream(f"publish to {m.subject!r}"):
                    answer = await self._stored_answer(token, future)
            except (TimeoutError, PigeonError):
                answer = _NO_STREAM
            if isinstance(answer, _NoStream):  # rare: route again and publish this one alone
                self._forget_routes()
                msg_id = m.id if m.has_explicit_id else None
                results.append(
                    await self._publish_stored(
                        await self._route(m.subject), m.subject, bytes(m.payload), m.key, m.headers, msg_id
                    )
                )
                continue
            if layout.partitions > 1:
                if not answer.duplicate:
                    await self._core(m.subject, bytes(m.payload), wire)
                answer = PubAck(layout.name, p, answer.offset, answer.duplicate)
            results.append(answer)
        return results

    # -- routing: which stream captures a subject ---------------------------------------------------

    def _forget_routes(self) -> None:
        self._routes_until = 0.0
        self._layouts.clear()

    async def _route(self, subject: str) -> Layout | None:
        """The stream capturing ``subject``, from a table of every stream's subjects that is
        listed again (``STREAM.LIST``) when older than ``route_cache_s``: subjects of any
        cardinality cost no lookup of their own."""
        if time.monotonic() >= self._routes_until:
            refresh = self._refreshing
            if refresh is None:
                refresh = self._refreshing = asyncio.ensure_future(self._list_streams())
                refresh.add_done_callback(lambda _: setattr(self, "_refreshing", None))
            await asyncio.shield(refresh)
        found = self._routes.match(subject)
        return found[0] if found else None

    async def _list_streams(self) -> None:
        started = time.monotonic()
        table: SubjectIndex[Layout] = SubjectIndex()
        offset = 0
        try:
            while True:
                answer = await self.js._api_request(
                    "$JS.API.STREAM.LIST",
                    json.dumps({"offset": offset}).encode(),
                    timeout=self.options.request_timeout_s,
                )
                streams = answer.get("streams") or []
                for data in streams:
                    info = StreamInfo.from_response(data)
                    if info.config.name is None or "~" in info.config.name:
                        continue  # a partition's own stream: reached through its pigeon stream
                    layout = _layout_of(info)
                    for pattern in layout.subjects:
                        with contextlib.suppress(InvalidSubjectError):
                            table.add(pattern, layout)
                offset += len(streams)
                if not streams or offset >= answer.get("total", 0):
                    break
        except ServiceUnavailableError:
            pass  # no JetStream: core messaging only, every publish returns None
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None
        self._routes = table
        self._routes_until = started + self.options.route_cache_s

    async def _layout(self, name: str, *, fresh: bool = False) -> Layout:
        now = time.monotonic()
        cached = self._layouts.get(name)
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        validate_name(name)
        with _jetstream(f"stream {name!r}"):
            info = await self.js.stream_info(name)
        layout = _layout_of(info)
        self._layouts[name] = (now + self.options.route_cache_s, layout)
        return layout

    # -- core messaging ----------------------------------------------------------------------------

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        self._check_open()
        validate_pattern(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)):
            raise InvalidConfigError(f"queue must be non-empty text without spaces, not {queue!r}")
        subscription = NatsSubscription(
            pattern, self.options.subscription_buffer, self._subscriptions.discard
        )
        with _jetstream(f"subscribe to {pattern!r}"):
            sub = await self.nc.subscribe(pattern, queue=queue or "", cb=subscription.receive)
        subscription.attach(sub)
        self._subscriptions.add(subscription)
        return subscription

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        self._check_publish(subject, payload, None)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        try:
            reply = await self.nc.request(
                subject, bytes(payload), timeout=timeout, headers=wire_headers(headers, None, None, None)
            )
        except nats.errors.NoRespondersError:
            raise NoRespondersError(f"no subscriber listens on {subject!r}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeoutError(f"no reply to the request on {subject!r} within {timeout}s") from None
        except nats.errors.MaxPayloadError:
            raise MessageTooLargeError(
                f"a request of {len(payload)} bytes exceeds the server's limit"
            ) from None
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None
        return read_message(reply.subject, reply.data, reply.headers)

    async def reply(
        self, request: Message, payload: bytes = b"", *, headers: Mapping[str, str] | None = None
    ) -> None:
        # Straight to the inbox: looking up a capturing stream for each inbox would cost a
        # round trip per reply (and inboxes are never captured).
        self._check_open()
        reply_to = request.headers.get(Headers.REPLY_TO)
        if not reply_to:
            raise InvalidMessageError(f"{request!r} is not a request: it has no {Headers.REPLY_TO} header")
        validate_subject(reply_to)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
        await self._core(reply_to, bytes(payload), wire_headers(headers, None, None, None))

    # -- streams ------------------------------------------------------------------------------------

    async def create_stream(self, spec: StreamSpec) -> None:
        self._check_open()
        if not isinstance(spec, StreamSpec):
            raise InvalidConfigError(f"create_stream takes a StreamSpec, not {type(spec).__name__}")
        _check_limits(spec)
        for pattern in spec.subjects:
            if pattern.startswith(_RESERVED_ROOTS) or pattern.split(".")[0] in (
                PARTITION_ROOT,
                COORDINATION_ROOT,
            ):
                raise InvalidConfigError(
                    f"stream {spec.name!r}: subjects under $PGN and $PGNC are pigeon's own"
                )
        existing = await self._stream_info(spec.name)
        if existing is not None:
            await self._adopt(spec, existing)
            return
        description = STREAM_DESCRIPTION + json.dumps(
            {"partitions": spec.partitions, "subjects": list(spec.subjects)}
        )
        with _jetstream(f"create stream {spec.name!r}"):
            try:
                if spec.partitions == 1:
                    await self.js.add_stream(
                        self._stream_config(spec, spec.name, spec.subjects, description, 1)
                    )
                else:
                    await self._create_partitioned(spec, description)
            except APIError as error:
                if error.err_code != STREAM_NAME_IN_USE:
                    raise
                # Created by someone else meanwhile: fine if it is the same stream.
                info = await self._stream_info(spec.name)
                if info is None:
                    raise
                await self._adopt(spec, info)
        self._forget_routes()

    async def _create_partitioned(self, spec: StreamSpec, description: str) -> None:
        layout = Layout.of(spec.name, spec.partitions, spec.subjects)
        for p, name in enumerate(layout.streams):
            config = self._stream_config(
                spec,
                name,
                (layout.prefixes[p] + ">",),
                STREAM_DESCRIPTION + json.dumps({"stream": spec.name, "partition": p}),
                spec.partitions,
            )
            with contextlib.suppress(StreamExistsError), _jetstream(f"create stream {name!r}"):
                await self.js.add_stream(config)
        # The stream named like the pigeon stream captures its subjects, so that JetStream
        # keeps other streams off them and publishers find the layout. Sealed, it stores
        # nothing: the core copy of each publish ends there.
        router = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            description=description,
            storage=StorageType.MEMORY,
            max_msgs=1,
            num_replicas=self.options.replicas,
            discard=DiscardPolicy.OLD,
        )
        try:
            info = await self.js.add_stream(router)
        except APIError:
            for name in layout.streams:
                with contextlib.suppress(APIError):
                    await self.js.delete_stream(name)
            raise
        await self._seal(info)

    async def _seal(self, info: StreamInfo) -> None:
        if not info.config.sealed:
            info.config.sealed = True
            await self.js.update_stream(info.config)

    async def _adopt(self, spec: StreamSpec, info: StreamInfo) -> None:
        """The stream exists: the same one (repair what a crash during creation left), or not."""
        layout = _layout_of(info)
        if layout.partitions != spec.partitions or set(layout.subjects) != set(spec.subjects):
            raise StreamExistsError(
                f"stream {spec.name!r} exists with {layout.partitions} partition(s) capturing "
                f"{list(layout.subjects)}"
            )
        if layout.partitions > 1:
            with _jetstream(f"create stream {spec.name!r}"):
                await self._seal(info)
                for p, name in enumerate(layout.streams):
                    if await self._stream_info(name) is None:
                        await self.js.add_stream(
                            self._stream_config(
                                spec,
                                name,
                                (layout.prefixes[p] + ">",),
                                STREAM_DESCRIPTION + json.dumps({"stream": spec.name, "partition": p}),
                                spec.partitions,
                            )
                        )

    def _stream_config(
        self, spec: StreamSpec, name: str, subjects: tuple[str, ...], description: str, share: int
    ) -> StreamConfig:
        # Limits apply to the whole stream: each partition gets its share.
        dedup = max(0.1, spec.dedup_window_s)  # JetStream's minimum; 0 would mean its 2 minutes
        if spec.max_age_s is not None:
            dedup = min(dedup, spec.max_age_s)
        return StreamConfig(
            name=name,
            subjects=list(subjects),
            description=description,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE if self.options.storage == "file" else StorageType.MEMORY,
            num_replicas=self.options.replicas,
            max_age=spec.max_age_s,
            max_msgs=-1 if spec.max_msgs is None else math.ceil(spec.max_msgs / share),
            max_bytes=-1 if spec.max_bytes is None else math.ceil(spec.max_bytes / share),
            duplicate_window=dedup,
        )

    async def _stream_info(self, name: str) -> StreamInfo | None:
        try:
            with _jetstream(f"stream {name!r}"):
                return await self.js.stream_info(name)
        except StreamNotFoundError:
            return None

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        layout = await self._layout(name, fresh=True)
        groups = await self._group_names(layout.streams[0])
        with _jetstream(f"delete stream {name!r}"):
            for stream in (name, *(s for s in layout.streams if s != name)):
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_stream(stream)
            # The dead letters of its groups (even deleted ones) and their coordination buckets.
            answer = await self.js._api_request(
                "$JS.API.STREAM.NAMES",
                json.dumps({"subject": dead_letter_subject(name, "*")}).encode(),
                timeout=self.options.request_timeout_s,
            )
            for dead_letters in answer.get("streams") or []:
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_stream(dead_letters)
                self._dead_letter_streams.discard(dead_letters)
            for group in groups:
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_stream(f"KV_{coordination_bucket(name, group)}")
        self._forget_routes()

    async def _group_names(self, stream: str) -> list[str]:
        with _jetstream(f"stream {stream!r}"):
            try:
                infos = await self.js.consumers_info(stream)
            except NotFoundError:
                return []
        return [i.name for i in infos if (i.config.description or "").startswith(GROUP_DESCRIPTION)]

    async def stream_state(self, name: str) -> StreamState:
        self._check_open()
        layout = await self._layout(name, fresh=True)
        with _jetstream(f"stream {name!r}"):
            infos = await asyncio.gather(*(self.js.stream_info(s) for s in layout.streams))
        return StreamState(
            name=name,
            subjects=layout.subjects,
            partitions=layout.partitions,
            messages=sum(i.state.messages for i in infos),
            last_offsets=tuple(i.state.last_seq - 1 for i in infos),
        )

    # -- groups -----------------------------------------------------------------------------------

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        self._check_open()
        if not isinstance(spec, ConsumerSpec):
            raise InvalidConfigError(f"consumer takes a ConsumerSpec, not {type(spec).__name__}")
        if member is not None and (not isinstance(member, str) or not member):
            raise InvalidConfigError(f"member must be non-empty text, not {member!r}")
        if spec.key_ordered:
            raise UnsupportedFeatureError(
                "nats",
                "key-ordered shared groups",
                "use an ordered group (kind='ordered'), which keeps every key in order",
            )
        layout = await self._layout(stream)
        if spec.dead_letter:
            dead_letter_stream_name(stream, spec.group)  # fail early on an impossible name
        ctx = GroupContext(self, layout, spec)
        name = member or f"{self.options.name}-{new_id()[-12:]}"
        joined: Member
        if spec.kind == "ordered":
            kv, bucket, ttl = await self._coordination(layout, spec.group)
            await self._ensure_group(layout, spec, ttl / 2)
            joined = await OrderedMember.join(ctx, name, kv, bucket, ttl)
        else:
            await self._ensure_group(layout, spec, spec.ack_wait_s)
            joined = await SharedMember.join(ctx, name)
        self._members.add(joined)
        return joined

    async def _coordination(self, layout: Layout, group: str) -> tuple[KeyValue, str, float]:
        bucket = coordination_bucket(layout.name, group)
        with _jetstream(f"group {group!r} on stream {layout.name!r}"):
            try:
                kv = await self.js.key_value(bucket)
            except BucketNotFoundError:
                try:
                    kv = await self.js.create_key_value(
                        KeyValueConfig(
                            bucket=bucket,
                            ttl=self.options.session_timeout_s,
                            history=1,
                            storage=StorageType.MEMORY,
                            replicas=self.options.replicas,
                        )
                    )
                except APIError as error:
                    if error.err_code != STREAM_NAME_IN_USE:
                        raise
                    kv = await self.js.key_value(bucket)  # created by another member meanwhile
            status = await kv.status()
        return kv, bucket, status.ttl or self.options.session_timeout_s

    async def _ensure_group(self, layout: Layout, spec: ConsumerSpec, ack_wait: float) -> None:
        description = GROUP_DESCRIPTION + json.dumps(spec_json(spec), sort_keys=True)
        config = ConsumerConfig(
            durable_name=spec.group,
            description=description,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            # One delivery more than max_deliver for shared groups: when the last allowed
            # delivery's lease runs out, pigeon gets it once more and dead-letters it.
            # Ordered groups count at nack time only (a rewind redelivers innocent messages).
            max_deliver=-1 if spec.max_deliver is None or spec.kind == "ordered" else spec.max_deliver + 1,
            max_ack_pending=(
                spec.max_ack_pending
                if spec.kind == "ordered"
                else math.ceil(spec.max_ack_pending / layout.partitions)
            ),
            **_start_config(spec),
        )

        async def ensure(stream: str) -> None:
            with _jetstream(f"group {spec.group!r} on stream {layout.name!r}"):
                try:
                    info = await self.js.consumer_info(stream, spec.group)
                except NotFoundError:
                    await self.js.add_consumer(stream, config)
                    return
            if info.config.description != description:
                raise GroupExistsError(
                    f"group {spec.group!r} on stream {layout.name!r} exists with a different configuration"
                )

        await asyncio.gather(*(ensure(s) for s in layout.streams))

    async def delete_group(self, stream: str, group: str) -> None:
        self._check_open()
        layout = await self._layout(stream, fresh=True)
        validate_name(group, "group")
        found = False
        with _jetstream(f"group {group!r} on stream {stream!r}"):
            for name in layout.streams:
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_consumer(name, group)
                    found = True
            with contextlib.suppress(NotFoundError):
                await self.js.delete_stream(f"KV_{coordination_bucket(stream, group)}")
        if not found:
            raise GroupNotFoundError(f"no group named {group!r} on stream {stream!r}")

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        self._check_open()
        layout = await self._layout(stream, fresh=True)
        validate_name(group, "group")
        with _jetstream(f"group {group!r} on stream {stream!r}"):
            streams = await asyncio.gather(*(self.js.stream_info(s) for s in layout.streams))
            consumers = await asyncio.gather(*(self.js.consumer_info(s, group) for s in layout.streams))
        owners: list[str | None] = [None] * layout.partitions
        if '"kind": "ordered"' in (consumers[0].config.description or ""):
            owners = await self._owners(layout, group)
        out = []
        for p, (s, c) in enumerate(zip(streams, consumers, strict=True)):
            head = s.state.last_seq
            pending, in_flight = c.num_pending or 0, c.num_ack_pending or 0
            lag = min(head, pending + in_flight)
            out.append(
                PartitionLag(
                    partition=p,
                    head=head,
                    committed=head - lag,
                    lag=lag,
                    pending=pending,
                    in_flight=in_flight,
                    waiting=0,
                    owner=owners[p],
                )
            )
        return out

    async def _owners(self, layout: Layout, group: str) -> list[str | None]:
        try:
            kv = await self.js.key_value(coordination_bucket(layout.name, group))
        except NotFoundError:
            return [None] * layout.partitions
        owners: list[str | None] = []
        for p in range(layout.partitions):
            try:
                entry = await kv.get(f"p.{p}")
                owners.append(json.loads(entry.value or b"{}").get("name"))
            except (NotFoundError, ValueError):
                owners.append(None)
        return owners

    # -- dead letters -------------------------------------------------------------------------------

    async def send_dead_letter(
        self, ctx: GroupContext, message: Message, delivery_count: int, failures: Failures
    ) -> None:
        stream, group = ctx.layout.name, ctx.spec.group
        name, subject = dead_letter_stream_name(stream, group), dead_letter_subject(stream, group)
        letter = dead_letter_message(message, group, delivery_count, failures, subject)
        with _jetstream(f"dead letters of group {group!r} on stream {stream!r}"):
            if name not in self._dead_letter_streams:
                # Created on first use with unlimited retention; create it beforehand to choose.
                with contextlib.suppress(StreamExistsError), _jetstream(f"create stream {name!r}"):
                    await self.js.add_stream(
                        self._stream_config(
                            StreamSpec(name, (subject,)),
                            name,
                            (subject,),
                            STREAM_DESCRIPTION + json.dumps({"partitions": 1, "subjects": [subject]}),
                            1,
                        )
                    )
                self._dead_letter_streams.add(name)
            wire = wire_headers(letter.headers, letter.key, letter.id, None)
            token, future = await self._send_stored(subject, letter.payload, wire)
            answer = await self._stored_answer(token, future)
        if isinstance(answer, _NoStream):
            self._dead_letter_streams.discard(name)
            raise StreamNotFoundError(f"the dead-letter stream {name!r} disappeared; the message is retried")

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        self._check_open()
        await self._layout(stream)
        validate_name(group, "group")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        name, subject = dead_letter_stream_name(stream, group), dead_letter_subject(stream, group)
        info = await self._stream_info(name)
        if info is None:
            return []
        out: list[Message] = []
        seq = info.state.first_seq
        with _jetstream(f"dead letters of group {group!r} on stream {stream!r}"):
            while len(out) < max_messages and seq <= info.state.last_seq:
                try:
                    raw = await self.js.get_msg(name, seq, subject=subject, next=True)
                except NotFoundError:
                    break
                assert raw.seq is not None and raw.subject is not None
                out.append(
                    read_message(
                        raw.subject,
                        raw.data or b"",
                        raw.headers,
                        timestamp=None if raw.time is None else raw.time.timestamp(),
                        stream=name,
                        partition=0,
                        offset=raw.seq - 1,
                    )
                )
                seq = raw.seq + 1
        return out


def _layout_of(info: StreamInfo) -> Layout:
    config = info.config
    assert config.name is not None
    description = config.description or ""
    if description.startswith(STREAM_DESCRIPTION):
        data = json.loads(description[len(STREAM_DESCRIPTION) :])
        if "partitions" in data:
            return Layout.of(config.name, int(data["partitions"]), tuple(data["subjects"]))
    # A stream pigeon did not create (or a partition's own stream): one partition, as is.
    return Layout.of(config.name, 1, tuple(config.subjects or ()))


def _check_limits(spec: StreamSpec) -> None:
    for name, minimum in (("max_age_s", 0.001), ("max_msgs", 1), ("max_bytes", 1)):
        value = getattr(spec, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < minimum
        ):
            raise InvalidConfigError(
                f"stream {spec.name!r}: {name} must be at least {minimum}, not {value!r}"
            )
    value = spec.dedup_window_s
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidConfigError(f"stream {spec.name!r}: dedup_window_s must be at least 0, not {value!r}")


def _start_config(spec: ConsumerSpec) -> dict[str, Any]:
    start = spec.start
    if start.kind == "earliest":
        return {"deliver_policy": DeliverPolicy.ALL}
    if start.kind == "latest":
        return {"deliver_policy": DeliverPolicy.NEW}
    if start.kind == "offset":
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": int(start.value) + 1}
    if start.kind == "time":
        return {
            "deliver_policy": DeliverPolicy.BY_START_TIME,
            "opt_start_time": datetime.fromtimestamp(start.value, UTC),
        }
    raise InvalidConfigError(f"group {spec.group!r}: unknown start {start.kind!r}")
