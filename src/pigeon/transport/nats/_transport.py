"""`NatsTransport`: connecting, publishing and routing, core messaging, joining groups, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from ...engine.config import validate_name
from ...engine.groups.deadletter import Failures, dead_letter_message
from ...engine.murmur2 import partition_for_key
from ...engine.stream import PubAck
from ...errors import (
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
    StreamSpec,
    Subscription,
    Transport,
)
from ._codec import SEALED, jetstream_errors, read_message, wire_headers
from ._core import NatsSubscription
from ._groups import FailureNotes, GroupContext, Member, SharedMember
from ._options import (
    ACK_INBOX_ROOT,
    RESERVED_ROOTS,
    STREAM_DESCRIPTION,
    Layout,
    NatsOptions,
    dead_letter_stream_name,
    dead_letter_subject,
    purge_subject,
)
from ._ordered import OrderedMember
from ._streams import StreamAdmin, layout_of

log = logging.getLogger("pigeon.transport.nats")

_PIPELINE = 512  # stored publishes of one batch in flight at once


class _NoStream:
    """The answer to a stored publish that no stream took (no responders)."""


_NO_STREAM = _NoStream()


class NatsTransport(StreamAdmin, Transport):
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
        super().__init__(nc, options)
        self.failures = FailureNotes()
        self._routes: SubjectIndex[Layout] = SubjectIndex()
        self._refreshing: asyncio.Future[None] | None = None
        self._round_robin: dict[str, int] = {}
        self._ack_prefix = f"{ACK_INBOX_ROOT}.{nc.new_inbox().rsplit('.', 1)[-1]}."
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_numbers = itertools.count()
        self._subscriptions: set[NatsSubscription] = set()
        self._members: set[Member] = set()

    @classmethod
    async def open(cls, url: str, options: Any = None) -> NatsTransport:
        if options is None:
            options = NatsOptions()
        elif not isinstance(options, NatsOptions):
            raise InvalidConfigError(f"options must be a NatsOptions, not {type(options).__name__}")

        async def on_error(error: Exception) -> None:
            log.warning("NATS connection error: %r", error)

        nc = Client()
        try:
            # Reconnects are unlimited once connected; nats-py applies that to the first
            # connection as well, hence the deadline.
            async with asyncio.timeout(options.connect_timeout_s):
                await nc.connect(
                    servers=[url],
                    name=options.name,
                    connect_timeout=options.connect_timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=options.reconnect_wait_s,
                    error_cb=on_error,
                    user_credentials=options.user_credentials,
                    tls=options.tls,
                )
        except (nats.errors.Error, OSError, ValueError, TimeoutError) as error:
            with contextlib.suppress(Exception):
                await nc.close()
            raise TransportClosedError(f"cannot connect to NATS at {url!r}: {error!r}") from None
        transport = cls(nc, options)
        from ._pigeon import PigeonServeTransport, serves_pigeon_api

        if cls is NatsTransport and await serves_pigeon_api(transport):
            # pigeon serve: its own API gives the engine's partitions, groups and dead letters
            # (and answers publishes itself, so the JetStream ack inbox below is not needed).
            return PigeonServeTransport(nc, options)
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
        try:
            answer = json.loads(msg.data)
            if not isinstance(answer, dict) or not ("error" in answer or "seq" in answer):
                raise ValueError(answer)
        except ValueError:
            # Someone other than JetStream answered the stored publish.
            raise PigeonError(f"unexpected answer to a stored publish: {msg.data[:200]!r}") from None
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
        if subject.startswith(RESERVED_ROOTS):
            raise InvalidSubjectError(f"subject {subject!r}: subjects under $PGN and $PGNC are pigeon's own")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
        if key is not None and not isinstance(key, str):
            raise InvalidMessageError(f"key must be text, not {type(key).__name__}")

    def _partition(self, layout: Layout, key: str | None, msg_id: str | None) -> int:
        if layout.partitions == 1:
            return 0
        if key is not None:
            return partition_for_key(key.encode(), layout.partitions)
        if msg_id is not None:
            # A retried publish must land where its first copy did, so that dedup sees it.
            return partition_for_key(msg_id.encode(), layout.partitions)
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
            answer = await self._answer_or_reroute(subject, token, future, retry=not attempt)
            if answer is None:
                return None  # the stream is gone; core subscribers got the message
            if isinstance(answer, _NoStream):
                self._forget_routes()
                layout = await self._route(subject)
                continue
            if layout.partitions > 1:
                if not answer.duplicate and not core_sent:
                    await self._core(subject, payload, wire)
                return PubAck(layout.name, p, answer.offset, answer.duplicate)
            return answer
        raise PigeonError(f"publish to {subject!r}: the streams capturing it keep changing; try again")

    async def _answer_or_reroute(
        self, subject: str, token: str, future: asyncio.Future[Msg], *, retry: bool = True
    ) -> PubAck | _NoStream | None:
        """JetStream's answer to a stored publish. `_NO_STREAM` when it must be routed again
        (no stream took it, or it reached a partitioned stream's sealed subjects); None when
        no acknowledgement came and no stream captures the subject any more."""
        try:
            with jetstream_errors(f"publish to {subject!r}"):
                try:
                    return await self._stored_answer(token, future)
                except APIError as error:
                    if error.err_code != SEALED or not retry:
                        raise
                    return _NO_STREAM
        except TimeoutError:
            self._forget_routes()
            layout = await self._route(subject)
            if layout is None:
                return None
            raise TimeoutError(
                f"publish to {subject!r}: no acknowledgement from stream {layout.name!r} within "
                f"{self.options.request_timeout_s}s (it may or may not be stored)"
            ) from None

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
        for index, item in enumerate(sent):
            if item is None:
                results.append(None)
                continue
            m, layout, p, wire, token, future = item
            try:
                answer = await self._answer_or_reroute(m.subject, token, future)
            except BaseException:
                for rest in sent[index + 1 :]:  # nobody will wait for these answers now
                    if rest is not None:
                        self._acks.pop(rest[4], None)
                raise
            if answer is None:
                results.append(None)
                continue
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

    async def _route(self, subject: str) -> Layout | None:
        """The stream capturing ``subject``, from a table of every stream's subjects that is
        listed again (``STREAM.LIST``) when older than ``route_cache_s``: subjects of any
        cardinality cost no lookup of their own."""
        if time.monotonic() >= self._routes_until:
            refresh = self._refreshing
            if refresh is None:
                refresh = self._refreshing = asyncio.ensure_future(self._refresh_routes())
                refresh.add_done_callback(lambda _: setattr(self, "_refreshing", None))
            await asyncio.shield(refresh)
        found = self._routes.match(subject)
        return found[0] if found else None

    async def _refresh_routes(self) -> None:
        started = time.monotonic()
        table: SubjectIndex[Layout] = SubjectIndex()
        try:
            for info in await self._stream_infos():
                layout = layout_of(info)
                if "~" in layout.name:
                    continue  # a partition's own stream: reached through its pigeon stream
                for pattern in layout.subjects:
                    with contextlib.suppress(InvalidSubjectError):
                        table.add(pattern, layout)
        except ServiceUnavailableError:
            pass  # no JetStream: core messaging only, every publish returns None
        except nats.errors.ConnectionClosedError:
            raise TransportClosedError("the NATS connection is closed") from None
        self._routes = table
        self._routes_until = started + self.options.route_cache_s

    # -- core messaging ----------------------------------------------------------------------------

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        self._check_open()
        validate_pattern(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)):
            raise InvalidConfigError(f"queue must be non-empty text without spaces, not {queue!r}")
        subscription = NatsSubscription(
            pattern, self.options.subscription_buffer, self._subscriptions.discard
        )
        with jetstream_errors(f"subscribe to {pattern!r}"):
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

    # -- purging ----------------------------------------------------------------------------------

    async def purge_stream(self, name: str) -> None:
        """Purge every partition. JetStream moves the groups past the purged messages and
        forgets their unacknowledged deliveries; members drop what they had prefetched of
        them: here at once, in other processes when the notice published here reaches them.
        Deliveries a member holds can still be settled (JetStream ignores the answer)."""
        self._check_open()
        layout = await self._layout(name, fresh=True)
        first_kept = await self._purge_partitions(layout)
        for member in self._members:
            if member.ctx.layout.name == name:
                member.puller.drop_below(first_kept)
        with jetstream_errors(f"purge stream {name!r}"):
            await self.nc.publish(purge_subject(name), json.dumps(first_kept).encode())

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

    # -- dead letters -------------------------------------------------------------------------------

    async def send_dead_letter(
        self, ctx: GroupContext, message: Message, delivery_count: int, failures: Failures
    ) -> None:
        stream, group = ctx.layout.name, ctx.spec.group
        name, subject = dead_letter_stream_name(stream, group), dead_letter_subject(stream, group)
        letter = dead_letter_message(message, group, delivery_count, failures, subject)
        with jetstream_errors(f"dead letters of group {group!r} on stream {stream!r}"):
            if name not in self._dead_letter_streams:
                # Created on first use with unlimited retention; create it beforehand to choose.
                with contextlib.suppress(StreamExistsError), jetstream_errors(f"create stream {name!r}"):
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
        with jetstream_errors(f"dead letters of group {group!r} on stream {stream!r}"):
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
