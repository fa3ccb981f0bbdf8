"""JetStream on pigeon's NATS server: the ``$JS.API`` requests, stream capture and acks.

Everything that arrives (API requests, publishes to stream subjects, acks) goes through one
queue read by one task, so a client sees its operations applied in the order it sent them:
publishes are stored in arrival order and an ack is applied before a later CONSUMER.INFO is
answered. Pull requests that wait for messages run in their own tasks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ...engine import Engine, Expect, SharedGroup, StreamConfig, StreamInfo
from ...engine.config import Durability
from ...errors import (
    ConcurrencyConflictError,
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidSubjectError,
    MessageTooLargeError,
    PigeonError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
)
from ...message import Message
from ...subjects import patterns_overlap
from ..nats import Delivery, NatsServer, Subscription
from ..nats.protocol import Pub, parse_headers
from . import errors
from .consumers import (
    PULL_CHUNK,
    PullConsumer,
    ack_policy_from_json,
    check_consumer_name,
    group_config_from_json,
    header_block,
    parse_pull_request,
)
from .errors import ApiError
from .meta import ConsumerMeta, MetaStore
from .streams import (
    check_visible,
    config_from_json,
    config_to_json,
    created_ns,
    max_msg_size,
    rfc3339,
    same_jetstream_settings,
    state_json,
    updated_config,
)

__all__ = ["JetStream"]

log = logging.getLogger("pigeon.server.jetstream")

_API = "$JS.API."
_TYPE = "io.nats.jetstream.api.v1."
_NO_RESPONDERS = b"NATS/1.0 503\r\n\r\n"
_NAMES_LIMIT = 1024
_STORE_RUN = 256
# Chunks of a pull served ahead of the acks that came with it: the client works on them
# while the acks are applied, so they must last it that long.
_HEAD_CHUNKS = 2
_LIST_LIMIT = 256
_NS = 1_000_000_000
# nats-server deletes an ephemeral consumer after this long without pull requests.
_EPHEMERAL_THRESHOLD_S = 5.0

Json = dict[str, Any]
_Handler = Callable[[list[str], Delivery], Awaitable[Json | None]]


def _request_json(payload: bytes) -> Json:
    if not payload.strip():
        return {}
    try:
        data = json.loads(payload)
    except ValueError as error:
        raise errors.invalid_json(str(error)) from None
    if not isinstance(data, dict):
        raise errors.invalid_json("expected an object")
    return data


# What the worker does, and on what: ("ack", Pub), the PUB a client sent to an ack subject;
# otherwise (kind, Delivery).
_Work = tuple[str, Any]


def _ack_op(delivery: Delivery) -> Pub:
    """An ack that came through routing, in the form acks from clients come in."""
    headers = delivery.headers or b""
    reply = (delivery.reply or "").encode()
    return Pub(delivery.subject.encode(), reply, len(headers), headers + delivery.payload)


class _WorkQueue:
    """What the worker reads: asyncio.Queue's put_nowait, get, get_nowait and empty, without
    the bookkeeping it does not use (every message stored or acked passes through here)."""

    def __init__(self) -> None:
        self._items: deque[_Work] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: _Work) -> None:
        self._items.append(item)  # once per message published into a stream: no list made
        self._wake()

    def put_many(self, items: list[_Work]) -> None:
        self._items.extend(items)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> _Work:
        return self._items.popleft()

    async def get(self) -> _Work:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class JetStream:
    """The JetStream API of one NatsServer over one Engine. ``await JetStream.attach(server, engine)``."""

    def __init__(self, server: NatsServer, engine: Engine, durability: Durability = "interval") -> None:
        self.server = server
        self.engine = engine
        self.durability = durability  # of the streams clients create
        self._queue = _WorkQueue()
        self._captures: dict[str, list[Subscription]] = {}
        self._consumers: dict[tuple[str, str], PullConsumer] = {}
        self._subscriptions: list[Subscription] = []
        self._worker: asyncio.Task[None] | None = None
        self._api_total = 0
        self._api_errors = 0
        self._meta = MetaStore(engine.path / "jetstream" / "consumers.json")

    @classmethod
    async def attach(
        cls, server: NatsServer, engine: Engine, *, durability: Durability = "interval"
    ) -> JetStream:
        """Serve JetStream on ``server`` (started) from ``engine``'s single-partition streams;
        streams created through it get ``durability``."""
        if durability not in ("always", "interval", "never"):
            raise InvalidConfigError(f"durability must be always, interval or never, not {durability!r}")
        try:
            server.port  # noqa: B018 - raises when the server is not started
        except TransportClosedError:
            # start() writes the INFO afresh: what attach advertised before would be lost.
            raise InvalidConfigError("attach JetStream to a started NatsServer") from None
        js = cls(server, engine, durability)
        server.advertise(jetstream=True)
        js._subscriptions = [
            server.subscribe(_API + ">", lambda d: js._queue.put_nowait(("api", d))),
            server.subscribe(
                "$JS.ACK.>",
                lambda d: js._queue.put_nowait(("ack", _ack_op(d))),
                raw=lambda ops, _conn: js._queue.put_many([("ack", op) for op in ops]),
            ),
        ]
        for name in engine.streams():
            info = engine.stream_info(name)
            if len(info.partitions) == 1:
                js._capture(info.config)
        # Ephemeral consumers do not outlive the server that made them.
        for (stream, consumer), meta in list(js._meta.entries.items()):
            if meta.ephemeral:
                js._meta.drop(stream, consumer)
                with contextlib.suppress(PigeonError, ValueError):
                    await engine.delete_group(stream, consumer)
        js._worker = asyncio.get_running_loop().create_task(js._run())
        return js

    async def close(self) -> None:
        """Stop serving; the server and the engine stay open. Idempotent."""
        for subscription in self._subscriptions + [s for subs in self._captures.values() for s in subs]:
            subscription.unsubscribe()
        self._subscriptions, self._captures = [], {}
        tasks = [t for c in self._consumers.values() for t in c.tasks]
        if self._worker is not None:
            tasks.append(self._worker)
            self._worker = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _capture(self, config: StreamConfig) -> None:
        limit = max_msg_size(config)

        def captured(delivery: Delivery) -> None:
            if limit is not None and len(delivery.payload) + len(delivery.headers or b"") > limit:
                # Refused unstored, as nats-server does: answered here, queued work untouched.
                error = errors.message_too_large().body()
                self._reply(delivery.reply, {"error": error, "stream": config.name, "seq": 0})
                return
            self._queue.put_nowait(("pub", delivery))

        self._captures[config.name] = [self.server.subscribe(p, captured) for p in config.subjects]

    async def _run(self) -> None:
        handlers: dict[str, Callable[[Delivery], Awaitable[None]]] = {
            "api": self._api,
            "reap": self._reap,
        }
        batched: dict[str, Callable[[list[Any]], Awaitable[None]]] = {
            "ack": self._acks,
            "pub": self._store_many,
        }
        while True:
            kind, delivery = await self._queue.get()
            if kind in batched:
                # Acks and publishes arrive in bursts (a client acks a fetched batch, or
                # publishes without waiting): take those of the kind already queued and apply
                # them together, in order: one write instead of one per message. Publishes
                # go _STORE_RUN at a time, their PubAcks sent before the next run is stored,
                # so that a client that publishes while acks come back never waits long.
                run, following = [delivery], None
                most = _STORE_RUN if kind == "pub" else None
                while following is None and not self._queue.empty() and len(run) != most:
                    item = self._queue.get_nowait()
                    if item[0] == kind:
                        run.append(item[1])
                    else:
                        following = item
                if (
                    kind == "ack"
                    and following is not None
                    and following[0] == "api"
                    and await self._pull_ahead_of_acks(following[1], run)
                ):
                    continue
                await self._guarded(kind, delivery, batched[kind](run))
                if following is None:
                    if not self._queue.empty():
                        await asyncio.sleep(0)  # the connections write this run's PubAcks
                    continue
                kind, delivery = following
                if kind in batched:
                    await self._guarded(kind, delivery, batched[kind]([delivery]))
                    continue
            await self._guarded(kind, delivery, handlers[kind](delivery))

    @staticmethod
    async def _guarded(kind: str, delivery: Delivery | Pub, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("JetStream failed on %s %r", kind, delivery.subject)

    def _reply(self, reply: str | None, body: Json) -> None:
        if reply:
            self.server.publish(reply, json.dumps(body, separators=(",", ":")).encode())

    # -- publishing into streams -----------------------------------------------------------

    async def _store_many(self, deliveries: list[Delivery]) -> None:
        """Store publishes in arrival order; runs into one stream without expectations go to
        the engine as one batch, each message still getting its own PubAck."""
        run: list[tuple[Delivery, Message | None]] = []  # None: no headers, stored as it came
        run_stream = ""
        stream_for_subject = self.engine.stream_for_subject
        for delivery in deliveries:
            try:
                stream = stream_for_subject(delivery.subject).name
            except PigeonError:
                continue  # the stream was deleted while this message was queued
            if run and stream != run_stream:
                await self._store_run(run_stream, run)
                run = []
            run_stream = stream
            if not delivery.headers:
                run.append((delivery, None))
                continue
            headers = dict(parse_headers(delivery.headers)[2])
            if any(name.startswith("Nats-Expected-") for name in headers):
                await self._store_run(run_stream, run)
                run = []
                await self._store(delivery, stream, headers)
                continue
            msg_id = headers.get("Nats-Msg-Id") or None
            run.append(
                (delivery, Message(delivery.subject, delivery.payload, headers=headers or None, id=msg_id))
            )
        await self._store_run(run_stream, run)

    async def _store_run(self, stream: str, run: list[tuple[Delivery, Message | None]]) -> None:
        if not run:
            return
        if len(run) > 1:
            subject = run[0][0].subject
            try:
                if all(message is None and delivery.subject == subject for delivery, message in run):
                    # One subject, no headers: the engine's bulk path, offsets in a row.
                    acks = await self.engine.publish_many(subject, [delivery.payload for delivery, _ in run])
                    first = acks[0].offset + 1
                    self._pub_acks(stream, [(d.reply, first + i, False) for i, (d, _) in enumerate(run)])
                    return
                messages = [m if m is not None else Message(d.subject, d.payload) for d, m in run]
                acks = await self.engine.publish_batch(messages)
            except PigeonError:
                pass  # one of them cannot be stored (a limit, a size): each gets its own answer
            else:
                self._pub_acks(
                    stream,
                    [(d.reply, a.offset + 1, a.duplicate) for (d, _), a in zip(run, acks, strict=True)],
                )
                return
        for delivery, message in run:
            await self._store(delivery, stream, message.headers if message is not None else {})

    def _pub_acks(self, stream: str, acks: list[tuple[str | None, int, bool]]) -> None:
        body = _pub_ack_template(stream)
        publish = self.server.publish
        for reply, seq, duplicate in acks:
            if reply:
                publish(reply, body % seq if not duplicate else _pub_ack(stream, seq, True))

    async def _store(self, delivery: Delivery, stream: str, headers: dict[str, str]) -> None:
        try:
            ack = await self.engine.publish(
                delivery.subject,
                delivery.payload,
                headers=headers or None,
                msg_id=headers.get("Nats-Msg-Id") or None,
                expect=_expectations(stream, headers),
            )
        except (ApiError, PigeonError) as error:
            failure = _store_error(error)
            self._reply(delivery.reply, {"error": failure.body(), "stream": stream, "seq": 0})
            return
        if delivery.reply:
            self.server.publish(delivery.reply, _pub_ack(stream, ack.offset + 1, ack.duplicate))

    # -- acks ------------------------------------------------------------------------------

    async def _acks(self, acks: list[Pub]) -> None:
        """Apply acks: each the PUB to ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
        <consumer seq>.<time>.<pending>`` a client sent; what does not fit is ignored."""
        plain: dict[PullConsumer, list[tuple[int, int]]] = {}
        names = (b"", b"")  # of the consumer the previous ack was for (acks come in runs)
        consumer: PullConsumer | None = None
        for ack in acks:
            try:
                _, _, stream, name, _, stream_seq, consumer_seq, _, _ = ack.subject.split(b".")
            except ValueError:
                continue  # not an ack subject of ours
            if not (stream_seq.isdigit() and consumer_seq.isdigit()):
                continue
            if names != (stream, name):
                names = (stream, name)
                try:
                    consumer = self._consumer_or_none(stream.decode(), name.decode())
                except UnicodeDecodeError:
                    consumer = None
            if consumer is None:
                continue
            sequences = (int(stream_seq), int(consumer_seq))
            payload = ack.data[ack.header_size :].strip()
            if payload in (b"", b"+ACK"):
                plain.setdefault(consumer, []).append(sequences)
                continue
            if consumer in plain:  # what this consumer was told before comes first
                await consumer.ack_many(plain.pop(consumer))
            await consumer.settle(*sequences, payload)
        for consumer, batch in plain.items():
            await consumer.ack_many(batch)
        for ack in acks:
            if ack.reply:  # a synchronous ack waits for this empty answer
                self.server.publish(ack.reply.decode(errors="replace"))

    # -- the API ---------------------------------------------------------------------------

    async def _api(self, delivery: Delivery) -> None:
        if not delivery.reply:
            return
        tokens = delivery.subject[len(_API) :].split(".")
        route = self._route(tokens)
        if route is None:
            return  # nats-server does not answer unknown API subjects either
        kind, handler = route
        self._api_total += 1
        try:
            body = await handler(tokens, delivery)
        except ApiError as error:
            self._api_errors += 1
            body = {"error": error.body()}
        if body is not None:
            self._reply(delivery.reply, {"type": _TYPE + kind + "_response", **body})

    def _route(self, tokens: list[str]) -> tuple[str, _Handler] | None:
        match tokens:
            case ["INFO"]:
                return "account_info", self._account_info
            case ["STREAM", "CREATE", _]:
                return "stream_create", self._stream_create
            case ["STREAM", "INFO", _]:
                return "stream_info", self._stream_info
            case ["STREAM", "DELETE", _]:
                return "stream_delete", self._stream_delete
            case ["STREAM", "PURGE", _]:
                return "stream_purge", self._stream_purge
            case ["STREAM", "NAMES"]:
                return "stream_names", self._stream_names
            case ["STREAM", "LIST"]:
                return "stream_list", self._stream_list
            case ["STREAM", "UPDATE", _]:
                return "stream_update", self._stream_update
            case ["STREAM", "MSG", "GET", _]:
                return "stream_msg_get", self._msg_get
            case ["DIRECT", "GET", _, *_]:
                return "direct_get", self._direct_get
            case ["CONSUMER", "NAMES", _]:
                return "consumer_names", self._consumer_names
            case ["CONSUMER", "LIST", _]:
                return "consumer_list", self._consumer_list
            case ["CONSUMER", "CREATE", _, *_] | ["CONSUMER", "DURABLE", "CREATE", _, _]:
                return "consumer_create", self._consumer_create
            case ["CONSUMER", "INFO", _, _]:
                return "consumer_info", self._consumer_info
            case ["CONSUMER", "DELETE", _, _]:
                return "consumer_delete", self._consumer_delete
            case ["CONSUMER", "MSG", "NEXT", _, _]:
                return "consumer_msg_next", self._msg_next
        return None

    def _visible_streams(self) -> list[str]:
        return [n for n in self.engine.streams() if len(self.engine.stream_info(n).partitions) == 1]

    def _stream(self, name: str) -> Json:
        info = self._served_stream(name)
        return {
            "config": config_to_json(info.config),
            "created": rfc3339(created_ns(info.config)),
            "state": state_json(self.engine, info),
            "ts": rfc3339(time.time_ns()),
        }

    async def _account_info(self, tokens: list[str], delivery: Delivery) -> Json:
        names = self._visible_streams()
        return {
            "memory": 0,
            "storage": sum(self.engine.stream_info(n).bytes for n in names),
            "reserved_memory": 0,
            "reserved_storage": 0,
            "streams": len(names),
            "consumers": sum(len(self.engine.groups(n)) for n in names),
            "limits": {
                "max_memory": -1,
                "max_storage": -1,
                "max_streams": -1,
                "max_consumers": -1,
                "max_ack_pending": -1,
                "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1,
                "max_bytes_required": False,
            },
            "api": {"level": 0, "total": self._api_total, "errors": self._api_errors},
        }

    async def _stream_create(self, tokens: list[str], delivery: Delivery) -> Json:
        name = tokens[2]
        data = _request_json(delivery.payload)
        if data.get("name") != name:
            raise errors.stream_name_mismatch()
        existed = name in self.engine.streams()
        old = self.engine.stream_info(name).config if existed else None
        # A stream made under another default durability is still the same stream.
        config = config_from_json(name, data, time.time_ns(), old.durability if old else self.durability)
        if old is not None and not same_jetstream_settings(old, config):
            raise errors.stream_name_in_use()
        try:
            await self.engine.create_stream(config)
        except StreamExistsError:
            raise errors.stream_name_in_use() from None
        except SubjectOverlapError:
            raise errors.subjects_overlap() from None
        if not existed:
            self._capture(config)
        # nats-server says did_create only when it did.
        return self._stream(name) if existed else {**self._stream(name), "did_create": True}

    async def _stream_info(self, tokens: list[str], delivery: Delivery) -> Json:
        return self._stream(tokens[2])

    async def _stream_delete(self, tokens: list[str], delivery: Delivery) -> Json:
        name = tokens[2]
        self._stream(name)
        self.stream_removed(name)
        await self.engine.delete_stream(name)
        return {"success": True}

    # -- streams made or deleted by pigeon's own API -----------------------------------------

    def stream_added(self, config: StreamConfig) -> None:
        """A stream created in the engine by someone else: capture it if JetStream can show it."""
        if config.partitions == 1 and config.name not in self._captures:
            self._capture(config)

    def stream_removed(self, name: str) -> None:
        """Forget a stream about to be deleted from the engine: its captures and consumers."""
        for subscription in self._captures.pop(name, []):
            subscription.unsubscribe()
        for key in [k for k in self._consumers if k[0] == name]:
            self._consumers.pop(key).cancel()
        self._meta.drop(name)

    def group_removed(self, stream: str, group: str) -> None:
        """Forget the consumer serving a group about to be deleted from the engine."""
        consumer = self._consumers.pop((stream, group), None)
        if consumer is not None:
            consumer.cancel()
        self._meta.drop(stream, group)

    async def _stream_purge(self, tokens: list[str], delivery: Delivery) -> Json:
        name = tokens[2]
        if _request_json(delivery.payload):
            raise errors.not_supported("a partial purge (filter, seq or keep)")
        purged = self._stream(name)["state"]["messages"]
        await self.engine.purge_stream(name)
        last_seq = self.engine.stream_info(name).partitions[0].next_offset
        for (stream, _), consumer in list(self._consumers.items()):
            if stream == name:
                await consumer.purged(last_seq)
        return {"success": True, "purged": purged}

    def _page(self, delivery: Delivery, limit: int) -> tuple[list[str], int, int]:
        data = _request_json(delivery.payload)
        names = self._visible_streams()
        subject = data.get("subject")
        if isinstance(subject, str) and subject:
            names = [
                n
                for n in names
                if any(patterns_overlap(subject, s) for s in self.engine.stream_info(n).config.subjects)
            ]
        offset = data.get("offset", 0)
        offset = offset if isinstance(offset, int) and offset > 0 else 0
        return names[offset : offset + limit], len(names), offset

    async def _stream_names(self, tokens: list[str], delivery: Delivery) -> Json:
        page, total, offset = self._page(delivery, _NAMES_LIMIT)
        return {"total": total, "offset": offset, "limit": _NAMES_LIMIT, "streams": page}

    async def _stream_list(self, tokens: list[str], delivery: Delivery) -> Json:
        page, total, offset = self._page(delivery, _LIST_LIMIT)
        streams = [self._stream(n) for n in page]
        return {"total": total, "offset": offset, "limit": _LIST_LIMIT, "streams": streams}

    async def _stream_update(self, tokens: list[str], delivery: Delivery) -> Json:
        name = tokens[2]
        data = _request_json(delivery.payload)
        self._stream(name)
        new = updated_config(self.engine.stream_info(name).config, data)
        try:
            # Persisted, and the new limits applied to what is stored, before the answer.
            await self.engine.update_stream(new)
        except SubjectOverlapError:
            raise errors.subjects_overlap() from None
        # The captures follow the new subjects (and the new max_msg_size) at once.
        for subscription in self._captures.pop(name, []):
            subscription.unsubscribe()
        self._capture(new)
        return self._stream(name)

    def _stored(self, stream: str, data: Json) -> Message:
        """The message a MSG.GET or DIRECT.GET request asks for (raises ApiError)."""
        seq, subject = data.get("seq"), data.get("last_by_subj")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 and subject is None:
            found = self.engine.fetch(stream, 0, seq - 1, 1)
            if found and found[0].offset == seq - 1:
                return found[0]
        elif isinstance(subject, str) and seq is None:
            try:
                last = self.engine.last_message(stream, subject)
            except InvalidSubjectError:
                raise errors.not_supported("a wildcard last_by_subj") from None
            if last is not None:
                return last
        elif set(data) - {"seq", "last_by_subj"}:
            raise errors.not_supported(f"message get by {sorted(set(data) - {'seq', 'last_by_subj'})}")
        else:
            raise errors.bad_request("request requires a sequence or a last_by_subj subject")
        raise errors.no_message_found()

    async def _msg_get(self, tokens: list[str], delivery: Delivery) -> Json:
        self._stream(tokens[3])
        message = self._stored(tokens[3], _request_json(delivery.payload))
        assert message.offset is not None
        body: Json = {"subject": message.subject, "seq": message.offset + 1}
        if message.headers:
            body["hdrs"] = base64.b64encode(header_block(message.headers)).decode()
        if message.payload:
            body["data"] = base64.b64encode(message.payload).decode()
        body["time"] = rfc3339(_timestamp_ns(message))
        return {"message": body}

    async def _direct_get(self, tokens: list[str], delivery: Delivery) -> None:
        assert delivery.reply is not None
        stream = tokens[2]
        try:
            self._stream(stream)
        except ApiError:
            # nats-server answers direct gets from a per-stream responder: none for no stream.
            self.server.publish(delivery.reply, headers=_NO_RESPONDERS)
            return None
        data = {"last_by_subj": ".".join(tokens[3:])} if len(tokens) > 3 else _request_json(delivery.payload)
        try:
            message = self._stored(stream, data)
        except ApiError as error:
            status = b"NATS/1.0 %d %b\r\n\r\n" % (error.code, _direct_status(error).encode())
            self.server.publish(delivery.reply, headers=status)
            return None
        assert message.offset is not None
        headers = dict(message.headers or {}) | {
            "Nats-Stream": stream,
            "Nats-Subject": message.subject,
            "Nats-Sequence": str(message.offset + 1),
            "Nats-Time-Stamp": rfc3339(_timestamp_ns(message)),
        }
        self.server.publish(delivery.reply, message.payload, headers=header_block(headers))
        return None

    # -- consumers -------------------------------------------------------------------------

    def _consumer_or_none(self, stream: str, name: str) -> PullConsumer | None:
        consumer = self._consumers.get((stream, name))
        if consumer is None:
            # A group made before a restart (or by pigeon's own API): serve it as a consumer.
            try:
                group = self.engine.group(stream, name)
            except (PigeonError, ValueError):
                return None
            if not isinstance(group, SharedGroup) or len(group.stream.partitions) != 1:
                return None
            meta = self._meta.get(stream, name) or ConsumerMeta()
            consumer = self._consumers[(stream, name)] = PullConsumer(self.server, self.engine, group, meta)
            self._watch_inactivity(consumer)
        return consumer

    def _served_stream(self, name: str) -> StreamInfo:
        """The stream JetStream serves under ``name`` (raises ApiError)."""
        try:
            info = self.engine.stream_info(name)
        except (StreamNotFoundError, ValueError):
            raise errors.stream_not_found() from None
        check_visible(info)
        return info

    def _consumer(self, stream: str, name: str) -> PullConsumer:
        self._served_stream(stream)  # not _stream: its state costs a read of the log, per pull
        consumer = self._consumer_or_none(stream, name)
        if consumer is None:
            raise errors.consumer_not_found()
        return consumer

    async def _consumer_create(self, tokens: list[str], delivery: Delivery) -> Json:
        data = _request_json(delivery.payload)
        config = data.get("config")
        if not isinstance(config, dict):
            raise errors.ApiError(400, 10078, "consumer config required")
        durable_api = tokens[1] == "DURABLE"
        stream = tokens[3] if durable_api else tokens[2]
        named = tokens[4] if durable_api else (tokens[3] if len(tokens) > 3 else None)
        if not durable_api and named is None and config.get("durable_name"):
            raise errors.ApiError(
                400, 10020, "consumer expected to be ephemeral but a durable name was set in request"
            )
        if not durable_api and len(tokens) > 4 and ".".join(tokens[4:]) != config.get("filter_subject"):
            raise errors.ApiError(
                400, 10131, "Consumer create request did not match filtered subject from create subject"
            )
        name = named or config.get("name") or config.get("durable_name") or _generated_name()
        if not isinstance(name, str):
            raise errors.bad_request("the consumer name must be a string")
        check_consumer_name(name)
        self._stream(stream)
        group_config, filters = group_config_from_json(self.engine, stream, name, config)
        ack_policy = ack_policy_from_json(config)
        ephemeral = not durable_api and not config.get("durable_name")
        threshold_ns = config.get("inactive_threshold") or 0
        if not isinstance(threshold_ns, int) or threshold_ns < 0:
            raise errors.bad_request("inactive_threshold must be a duration in nanoseconds")
        threshold = threshold_ns / _NS if threshold_ns else (_EPHEMERAL_THRESHOLD_S if ephemeral else None)
        meta = ConsumerMeta(filters, ephemeral, threshold, time.time_ns(), ack_policy)
        known = self._meta.get(stream, name)
        if known is not None and known.ack_policy != ack_policy:
            raise errors.ack_policy_not_updatable()
        if known is not None and (known.filters, known.ephemeral) != (filters, ephemeral):
            raise errors.consumer_exists()
        try:
            group = await self.engine.shared_group(stream, group_config)
        except GroupExistsError:
            raise errors.consumer_exists() from None
        except ValueError as error:
            raise errors.bad_request(str(error)) from None
        if known is None:
            self._meta.put(stream, name, meta)
        if (stream, name) not in self._consumers:
            consumer = PullConsumer(self.server, self.engine, group, known or meta)
            self._consumers[(stream, name)] = consumer
            self._watch_inactivity(consumer)
        return {**self._consumers[(stream, name)].info(), "ts": rfc3339(time.time_ns())}

    def _watch_inactivity(self, consumer: PullConsumer) -> None:
        threshold = consumer.meta.inactive_threshold_s
        if threshold is None:
            return

        async def watch() -> None:
            while True:
                idle = consumer.idle_s()
                if idle >= threshold:
                    break
                await asyncio.sleep(threshold - idle)
            # Deleted by the worker, in turn with the requests that may be using it.
            self._queue.put_nowait(("reap", Delivery(f"{consumer.stream}.{consumer.name}", None, None, b"")))

        task = asyncio.get_running_loop().create_task(watch())
        consumer.tasks.add(task)
        task.add_done_callback(_finished(consumer))

    async def _reap(self, delivery: Delivery) -> None:
        stream, name = delivery.subject.split(".", 1)  # stream names hold no "."
        consumer = self._consumers.get((stream, name))
        if consumer is None:
            return
        if consumer.idle_s() < (consumer.meta.inactive_threshold_s or 0):
            self._watch_inactivity(consumer)  # a pull request came meanwhile
            return
        await self._delete_consumer(consumer)

    async def _delete_consumer(self, consumer: PullConsumer) -> None:
        consumer.cancel()
        self._consumers.pop((consumer.stream, consumer.name), None)
        self._meta.drop(consumer.stream, consumer.name)
        with contextlib.suppress(GroupNotFoundError):
            await self.engine.delete_group(consumer.stream, consumer.name)

    def _consumer_page(self, stream: str, delivery: Delivery, limit: int) -> tuple[list[PullConsumer], Json]:
        self._stream(stream)
        data = _request_json(delivery.payload)
        offset = data.get("offset", 0)
        offset = offset if isinstance(offset, int) and not isinstance(offset, bool) and offset > 0 else 0
        found = [self._consumer_or_none(stream, name) for name in self.engine.groups(stream)]
        consumers = sorted((c for c in found if c is not None), key=lambda c: c.name)
        return consumers[offset : offset + limit], {"total": len(consumers), "offset": offset, "limit": limit}

    async def _consumer_names(self, tokens: list[str], delivery: Delivery) -> Json:
        page, body = self._consumer_page(tokens[2], delivery, _NAMES_LIMIT)
        return {**body, "consumers": [c.name for c in page]}

    async def _consumer_list(self, tokens: list[str], delivery: Delivery) -> Json:
        page, body = self._consumer_page(tokens[2], delivery, _LIST_LIMIT)
        now = rfc3339(time.time_ns())
        return {**body, "consumers": [{**c.info(), "ts": now} for c in page]}

    async def _consumer_info(self, tokens: list[str], delivery: Delivery) -> Json:
        return {**self._consumer(tokens[2], tokens[3]).info(), "ts": rfc3339(time.time_ns())}

    async def _consumer_delete(self, tokens: list[str], delivery: Delivery) -> Json:
        await self._delete_consumer(self._consumer(tokens[2], tokens[3]))
        return {"success": True}

    async def _msg_next(self, tokens: list[str], delivery: Delivery) -> None:
        assert delivery.reply is not None
        try:
            consumer = self._consumer(tokens[3], tokens[4])
        except ApiError:
            # nats-server has no responder for a consumer that does not exist.
            self.server.publish(delivery.reply, headers=_NO_RESPONDERS)
            return None
        try:
            batch, expires, no_wait = parse_pull_request(delivery.payload)
        except ApiError as error:
            self.server.publish(
                delivery.reply, headers=b"NATS/1.0 400 %b\r\n\r\n" % error.description.encode()
            )
            return None
        self._start_pull(consumer, delivery.reply, batch, expires, no_wait)
        return None

    def _start_pull(
        self, consumer: PullConsumer, reply: str, batch: int, expires: float | None, no_wait: bool
    ) -> None:
        task = asyncio.get_running_loop().create_task(consumer.pull(reply, batch, expires, no_wait))
        consumer.tasks.add(task)
        task.add_done_callback(_finished(consumer))

    async def _pull_ahead_of_acks(self, request: Delivery, acks: list[Pub]) -> bool:
        """Serve the first chunk of the pull ``request`` before the ``acks`` queued just ahead
        of it, then apply them; False, having done nothing, when that could change the chunk.

        A client acks a fetched batch and asks for the next one in the same write. Plain acks
        that no one waits for only finish messages out on lease: they redeliver or skip nothing
        and leave the pending counts in the ack subjects as they were. So with room for the
        chunk under max_ack_pending before they free any, the chunk holds what it would hold
        after them, and the client works on it while they are applied.
        """
        tokens = request.subject[len(_API) :].split(".")
        if len(tokens) != 5 or tokens[:3] != ["CONSUMER", "MSG", "NEXT"] or not request.reply:
            return False
        if any(ack.reply or ack.data.strip() not in (b"", b"+ACK") for ack in acks):
            return False  # (a header block counts as more than a plain ack too)
        try:
            consumer = self._consumer(tokens[3], tokens[4])
            batch, expires, no_wait = parse_pull_request(request.payload)
        except ApiError:
            return False  # answered in turn, as usual
        head = min(batch, _HEAD_CHUNKS * PULL_CHUNK)
        if consumer.meta.filters or not consumer.has_room(head):
            return False
        self._api_total += 1
        sent = 0
        while sent < head:
            asked = min(head - sent, PULL_CHUNK)
            got = await consumer.pull_head(request.reply, asked)
            sent += got
            await asyncio.sleep(0)  # the connection writes the chunk on this turn of the loop
            if got < asked:
                break
        await self._guarded("ack", acks[0], self._acks(acks))
        if sent < batch:
            self._start_pull(consumer, request.reply, batch - sent, expires, no_wait)
        return True


def _timestamp_ns(message: Message) -> int:
    return round(message.timestamp * 1_000_000) * 1000


def _direct_status(error: ApiError) -> str:
    return "Message Not Found" if error.code == 404 else error.description


def _generated_name() -> str:
    return uuid.uuid4().hex[:8].upper()


def _finished(consumer: PullConsumer) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        consumer.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The stream or consumer went away under a waiting pull request: it just ends.
            log.debug("pull request on %s ended: %r", consumer.name, task.exception())

    return done


def _pub_ack_template(stream: str) -> bytes:
    # Stream names are plain tokens ([A-Za-z0-9_-]), so no JSON escaping is needed.
    return b'{"stream":"%b","seq":%%d}' % stream.encode()


def _pub_ack(stream: str, seq: int, duplicate: bool) -> bytes:
    # Stream names are plain tokens ([A-Za-z0-9_-]), so no JSON escaping is needed.
    if duplicate:
        return b'{"stream":"%s","seq":%d,"duplicate":true}' % (stream.encode(), seq)
    return b'{"stream":"%s","seq":%d}' % (stream.encode(), seq)


def _store_error(error: ApiError | PigeonError) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ConcurrencyConflictError):
        return errors.wrong_last_sequence((-1 if error.actual is None else error.actual) + 1)
    if isinstance(error, MessageTooLargeError):
        return errors.message_too_large()
    if isinstance(error, StreamFullError):  # discard new: nats-server's words for it
        return errors.store_failed(
            "maximum bytes exceeded" if error.limit == "bytes" else "maximum messages exceeded"
        )
    return errors.store_failed(str(error))


def _expectations(stream: str, headers: dict[str, str]) -> Expect | None:
    if "Nats-Expected-Last-Msg-Id" in headers:
        raise errors.not_supported("Nats-Expected-Last-Msg-Id")
    expected_stream = headers.get("Nats-Expected-Stream")
    if expected_stream is not None and expected_stream != stream:
        raise errors.expected_stream_mismatch()
    last = _sequence(headers.get("Nats-Expected-Last-Sequence"))
    last_subject = _sequence(headers.get("Nats-Expected-Last-Subject-Sequence"))
    if last is None and last_subject is None:
        return None
    return Expect(
        last_offset=None if last is None else last - 1,
        last_subject_offset=None if last_subject is None else last_subject - 1,
    )


def _sequence(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.strip().isdigit():
        raise errors.bad_request(f"invalid expected sequence {text!r}")
    return int(text)
