"""`RedisTransport`: streams and their registry, publishing, groups, lag and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions

from ...engine.config import StartAt, validate_name
from ...engine.groups.deadletter import Failures, dead_letter_message, dead_letter_subject
from ...engine.murmur2 import partition_for_key
from ...engine.stream import PubAck
from ...errors import (
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    NoRespondersError,
    RequestTimeoutError,
    StreamNotFoundError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from ...message import Message, new_id
from ...subjects import SubjectIndex, validate_subject
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
from ._codec import check_message, entry_fields, entry_message, frame_head
from ._core import Core
from ._groups import GroupContext, RedisMember, SharedMember
from ._lua import SCRIPTS
from ._options import Keys, RedisOptions
from ._ordered import OrderedMember
from ._registry import (
    MAX_SEQ,
    StreamRecord,
    check_create,
    check_limits,
    cmd,
    dead_letter_name,
    id_before,
    id_number,
    id_text,
    offset_of,
    parse_registry,
    spec_record,
)

CAPABILITIES = Capabilities(
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
    emulated=frozenset(
        {
            "wildcards",
            "queue_groups",
            "request_reply",
            "partitions",
            "ordered_groups",
            "per_key_order",
            "delayed_nack",
            "ack_timeout",
            "max_deliver",
            "dead_letters",
            "dedup",
            "replay_offset",
            "lag",
        }
    ),
)


class RedisTransport(Transport):
    """Pigeon on Redis 7 (see the package docstring for the design)."""

    name: ClassVar[str] = "redis"
    capabilities: ClassVar[Capabilities] = CAPABILITIES
    emulation_notes: ClassVar[dict[str, str]] = {
        "wildcards": "PSUBSCRIBE to a glob that may over-match (a glob `*` crosses dots); "
        "pigeon filters with NATS matching",
        "queue_groups": "each member listens on a channel of its own and registers in a hash; "
        "the publish script sends to one live member of each matching group",
        "request_reply": "one inbox pattern per transport (`_INBOX.<id>.*`); the reply subject "
        "travels in the frame; PUBLISH's receiver count of 0 means no responders",
        "partitions": "one Redis stream per partition, keys routed with murmur2; dense offsets "
        "from a counter incremented in the same script as the XADD",
        "ordered_groups": "partition locks (SET NX PX, renewed by heartbeats) over a shared list "
        "of live members; one batch per partition; commit = XACK under the lock",
        "per_key_order": "through ordered groups (key-ordered shared groups are refused)",
        "delayed_nack": "the entry leaves the PEL for a zset of due times; a fetch claims it "
        "back (XCLAIM FORCE RETRYCOUNT) once due",
        "ack_timeout": "the PEL idle time is the lease; fetches take expired ones with XAUTOCLAIM "
        "(min idle = ack_wait), idle members every claim_interval_s",
        "max_deliver": "the PEL delivery counter, checked by pigeon on nack and on reclaim",
        "dead_letters": "pigeon publishes dead_letter_message to `<stream>-<group>-dlq`, then acks",
        "dedup": "SET NX PX (the dedup window) holding the original position, in the same Lua "
        "script as the XADD",
        "replay_offset": "a binary search over entry ids for the stored offset field",
        "lag": "computed from the offset counter, XINFO GROUPS' last-delivered id, the PEL and the "
        "delayed zset",
    }

    def __init__(self, client: redis.asyncio.Redis, url: str, options: RedisOptions) -> None:
        self.client = client
        self.url = url
        self.options = options
        self.keys = Keys(options.prefix)
        self.scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}
        self.core = Core(client, self.keys, options.subscription_buffer)
        self._streams: dict[str, StreamRecord] = {}
        self._routes: SubjectIndex[str] = SubjectIndex()
        self._version = b"0"
        self._turns: dict[str, int] = {}
        self._members: set[RedisMember] = set()
        self._closed = False

    @classmethod
    async def open(cls, url: str, options: Any = None) -> RedisTransport:
        if options is None:
            options = RedisOptions()
        elif not isinstance(options, RedisOptions):
            raise InvalidConfigError(f"options must be a RedisOptions, not {type(options).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise InvalidConfigError(f"not a redis URL: {url!r}; use redis://host:port/db")
        try:
            client = redis.asyncio.from_url(
                url,
                decode_responses=False,
                socket_connect_timeout=options.connect_timeout_s,
                max_connections=options.max_connections,
            )
        except ValueError as error:
            raise InvalidConfigError(f"bad redis URL {url!r}: {error}") from None
        transport = cls(client, url, options)
        try:
            await client.ping()
            await transport._load_registry()
        except redis.exceptions.RedisError as error:
            await client.aclose()
            raise TransportClosedError(
                f"cannot reach redis at {parts.hostname}:{parts.port}: {error}"
            ) from None
        return transport

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for member in list(self._members):
            with contextlib.suppress(Exception):
                await member.close()
        await self.core.close()
        await self.client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("the redis transport is closed")

    # -- the stream registry --------------------------------------------------------------------

    async def _load_registry(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.version)
            pipe.hgetall(self.keys.registry)
            version, records = await pipe.execute()
        streams = parse_registry(records)
        routes: SubjectIndex[str] = SubjectIndex()
        for stream in streams.values():
            for pattern in stream.subjects:
                routes.add(pattern, stream.name)
        self._streams, self._routes, self._version = streams, routes, version or b"0"

    async def _stream(self, name: str) -> StreamRecord:
        """The registry's current record of stream ``name`` (read from Redis, not the cache)."""
        validate_name(name)
        record = await cmd(self.client, "HGET", self.keys.registry, name)
        if record is None:
            raise StreamNotFoundError(f"no stream named {name!r}")
        return StreamRecord.from_record(name, record)

    async def create_stream(self, spec: StreamSpec) -> None:
        self._check_open()
        if not isinstance(spec, StreamSpec):
            raise InvalidConfigError(f"create_stream takes a StreamSpec, not {type(spec).__name__}")
        if spec.max_bytes is not None:
            raise UnsupportedFeatureError(
                self.name,
                "max_bytes retention",
                "Redis streams are trimmed by count or by age: use max_msgs or max_age_s",
            )
        check_limits(spec)
        wanted = StreamRecord.from_spec(spec)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.registry)
                    records = await cmd(pipe, "HGETALL", self.keys.registry)
                    if check_create(wanted, parse_registry(records)):
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        break
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.keys.registry, spec.name, wanted.record())
                    pipe.incr(self.keys.version)
                    await pipe.execute()
                    break
                except redis.exceptions.WatchError:
                    continue
        await self._load_registry()

    async def delete_stream(self, name: str) -> None:
        """Delete the stream, its groups, and their dead-letter streams."""
        self._check_open()
        stream = await self._stream(name)
        groups = [g.decode() for g in await cmd(self.client, "HKEYS", self.keys.groups(name))]
        async with self.client.pipeline(transaction=True) as pipe:
            # Publishers see the new version at once and stop routing here.
            pipe.hdel(self.keys.registry, name)
            pipe.incr(self.keys.version)
            pipe.delete(
                *(self.keys.partition(name, p) for p in range(stream.partitions)),
                self.keys.meta(name),
                self.keys.groups(name),
                *(k for g in groups for k in self._group_keys(name, g, stream.partitions)),
            )
            await pipe.execute()
        cursor = 0
        while True:
            cursor, found = await self.client.scan(cursor, match=self.keys.dedup_pattern(name), count=1000)
            if found:
                await self.client.unlink(*found)
            if not cursor:
                break
        await self._load_registry()
        for group in groups:
            dead_letters = f"{name}-{group}-dlq"
            if dead_letters in self._streams:
                with contextlib.suppress(StreamNotFoundError):
                    await self.delete_stream(dead_letters)

    def _group_keys(self, stream: str, group: str, partitions: int) -> list[str]:
        keys = [
            self.keys.delayed(stream, group),
            self.keys.failures(stream, group),
            self.keys.members(stream, group),
        ]
        for p in range(partitions):
            keys += [self.keys.lock(stream, group, p), self.keys.pause(stream, group, p)]
        return keys

    async def stream_state(self, name: str) -> StreamState:
        self._check_open()
        stream = await self._stream(name)
        keys = [self.keys.meta(name), *(self.keys.partition(name, p) for p in range(stream.partitions))]
        rows = await self.scripts["state"](keys=keys, args=[stream.max_age_arg, self._trim_mode])
        return StreamState(
            name=name,
            subjects=stream.subjects,
            partitions=stream.partitions,
            messages=sum(int(length) for length, _ in rows),
            last_offsets=tuple(int(next_offset) - 1 for _, next_offset in rows),
        )

    async def list_streams(self) -> list[str]:
        """The registry's streams: dead-letter streams included, nothing of other prefixes."""
        self._check_open()
        return sorted(name.decode() for name in await cmd(self.client, "HKEYS", self.keys.registry))

    async def purge_stream(self, name: str) -> None:
        """Empty every partition; its groups, their positions and the offset counters stay.

        Entries a member holds stay in its group's pending list, so settling them works; a
        lease that expires, a nack's redelivery or a new owner's re-read finds the entry gone
        and drops it. Every delayed nack, failure record and ordered pause refers to a message
        that was delivered, hence purged, so they go with it."""
        self._check_open()
        stream = await self._stream(name)
        groups = [g.decode() for g in await cmd(self.client, "HKEYS", self.keys.groups(name))]
        async with self.client.pipeline(transaction=True) as pipe:
            for p in range(stream.partitions):
                pipe.execute_command("XTRIM", self.keys.partition(name, p), "MAXLEN", 0)
            for group in groups:
                pipe.delete(
                    self.keys.delayed(name, group),
                    self.keys.failures(name, group),
                    *(self.keys.pause(name, group, p) for p in range(stream.partitions)),
                )
            await pipe.execute()

    @property
    def _trim_mode(self) -> str:
        return "=" if self.options.exact_trim else "~"

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        self._check_open()
        validate_subject(subject)
        checked = check_message(payload, key, headers, msg_id)
        ack, _ = await self._publish(subject, bytes(payload), key, checked, msg_id, None, core=True)
        return ack

    async def publish_batch(self, messages: Sequence[Message]) -> list[PubAck | None]:
        """Pipelined: one round trip for the batch (each message is still its own script)."""
        self._check_open()
        calls = []
        for m in messages:
            if not isinstance(m, Message):
                raise InvalidConfigError(f"publish_batch takes Message objects, not {m!r}")
            validate_subject(m.subject)
            headers = check_message(m.payload, m.key, m._headers, m.id if m.has_explicit_id else None)
            calls.append((m.subject, bytes(m.payload), m.key, headers, m.id if m.has_explicit_id else None))
        acks: list[PubAck | None] = []
        while len(acks) < len(calls):
            prepared = [self._prepare(*call, None, core=True) for call in calls[len(acks) :]]
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args, _ in prepared:
                    await self.scripts["publish"](keys=keys, args=args, client=pipe)
                results = await pipe.execute()
            for (_, _, stream), result in zip(prepared, results, strict=True):
                if int(result[0]) == -1:
                    # The routing table changed under this batch: reroute the rest, in order.
                    await self._load_registry()
                    break
                acks.append(self._ack(stream, result))
        return acks

    async def _publish(
        self,
        subject: str,
        payload: bytes,
        key: str | None,
        headers: dict[str, str] | None,
        msg_id: str | None,
        reply_to: str | None,
        *,
        core: bool,
    ) -> tuple[PubAck | None, int]:
        while True:
            keys, args, stream = self._prepare(subject, payload, key, headers, msg_id, reply_to, core=core)
            result = await self.scripts["publish"](keys=keys, args=args)
            if int(result[0]) != -1:
                return self._ack(stream, result), int(result[3])
            await self._load_registry()  # a stream was created or deleted meanwhile

    @staticmethod
    def _ack(stream: StreamRecord | None, result: Sequence[Any]) -> PubAck | None:
        if stream is None:
            return None
        return PubAck(stream.name, int(result[1]), int(result[2]), int(result[0]) == 1)

    def _prepare(
        self,
        subject: str,
        payload: bytes,
        key: str | None,
        headers: dict[str, str] | None,
        msg_id: str | None,
        reply_to: str | None,
        *,
        core: bool,
    ) -> tuple[list[str], list[Any], StreamRecord | None]:
        """The publish script's keys and arguments, routed with the cached registry."""
        keys = self.keys
        found = self._routes.match(subject)
        stream = self._streams[found[0]] if found else None
        placeholder = keys.version  # a key the script does not touch in that case
        shown_id = msg_id
        if stream is None:
            script_keys = [keys.version, placeholder, placeholder, placeholder, keys.queues]
            stored: list[Any] = ["", "", "", ""]
            fields: list[Any] = []
        else:
            if key is not None:
                p = partition_for_key(key.encode(), stream.partitions)
            else:
                # Unkeyed messages go round the partitions.
                p = self._turns.get(stream.name, -1) + 1
                p = self._turns[stream.name] = p % stream.partitions
            dedup = stream.dedup_arg if msg_id is not None else ""
            dedup_key = keys.dedup(stream.name, msg_id) if dedup and msg_id is not None else placeholder
            generated = None if msg_id is not None else new_id()
            shown_id = msg_id or generated
            script_keys = [
                keys.version,
                keys.partition(stream.name, p),
                keys.meta(stream.name),
                dedup_key,
                keys.queues,
            ]
            stored = [str(p), stream.maxlen_arg, stream.max_age_arg, dedup]
            fields = entry_fields(key, headers, msg_id, generated)
        channel = keys.channel(subject) if core else ""
        head = frame_head(subject, headers, key, shown_id, reply_to) if core else b""
        args = [
            self._version,
            *stored,
            channel,
            subject,
            head,
            payload,
            self._trim_mode,
            keys.queue_channel_prefix,
        ]
        return script_keys, args + fields, stream

    # -- core messaging -------------------------------------------------------------------------

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        self._check_open()
        return await self.core.subscribe(pattern, queue)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        self._check_open()
        validate_subject(subject)
        checked = check_message(payload, None, headers, None)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        reply_subject, reply = await self.core.inbox()
        try:
            _, receivers = await self._publish(
                subject, bytes(payload), None, checked, None, reply_subject, core=True
            )
            if not receivers:
                raise NoRespondersError(f"no subscriber for request on {subject!r}")
            try:
                return await asyncio.wait_for(reply, timeout)
            except TimeoutError:
                raise RequestTimeoutError(f"no reply to request on {subject!r} within {timeout}s") from None
        finally:
            self.core.forget(reply_subject)

    # -- groups ---------------------------------------------------------------------------------

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        self._check_open()
        if not isinstance(spec, ConsumerSpec):
            raise InvalidConfigError(f"consumer takes a ConsumerSpec, not {type(spec).__name__}")
        if spec.key_ordered:
            raise UnsupportedFeatureError(
                self.name,
                "key-ordered shared groups",
                "use an ordered group (kind='ordered'): each key's partition is read in order",
            )
        if member is None:
            member = f"m-{uuid.uuid4().hex[:12]}"
        validate_name(member, "member")
        info = await self._stream(stream)
        if spec.dead_letter:
            dead_letter_name(stream, spec.group)
        record = json.dumps(spec_record(spec), sort_keys=True)
        groups_key = self.keys.groups(stream)
        if not await self.client.hsetnx(groups_key, spec.group, record):
            existing = await cmd(self.client, "HGET", groups_key, spec.group)
            if existing is not None and json.loads(existing) != json.loads(record):
                raise GroupExistsError(
                    f"group {spec.group!r} on stream {stream!r} exists with a different configuration"
                )
        await self._create_redis_groups(info, spec)
        ctx = GroupContext(
            client=self.client,
            keys=self.keys,
            options=self.options,
            scripts=self.scripts,
            stream=stream,
            partitions=info.partitions,
            spec=spec,
            dead_letter=lambda message, count, failures: self._dead_letter(
                stream, spec.group, message, count, failures
            ),
            forget=self._members.discard,
        )
        consumer: RedisMember
        if spec.kind == "ordered":
            ordered = OrderedMember(ctx, member)
            await ordered.join()
            consumer = ordered
        else:
            consumer = SharedMember(ctx, member)
        self._members.add(consumer)
        return consumer

    async def _create_redis_groups(self, stream: StreamRecord, spec: ConsumerSpec) -> None:
        """One Redis group per partition, at the group's start (an existing one is kept)."""
        for p in range(stream.partitions):
            key = self.keys.partition(stream.name, p)
            start = await self._start_id(key, spec.start)
            try:
                await cmd(self.client, "XGROUP", "CREATE", key, spec.group, start, "MKSTREAM")
            except redis.exceptions.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def _start_id(self, key: str, start: StartAt) -> str:
        """The id a new Redis group starts after (its last-delivered id)."""
        if start.kind == "earliest":
            return "0"
        if start.kind == "latest":
            return "$"
        if start.kind == "time":
            return id_before(math.ceil(start.value * 1000), 0)
        if start.kind == "offset":
            return await self.id_before_offset(key, int(start.value))
        raise InvalidConfigError(f"unknown start {start!r}")

    async def id_before_offset(self, key: str, offset: int) -> str:
        """Binary search over entry ids for the first entry at ``offset`` or later.

        Offsets grow with ids, so the search needs only XRANGE ... COUNT 1 probes.
        """
        first = await cmd(self.client, "XRANGE", key, "-", "+", "COUNT", 1)
        if not first or offset_of(first[0]) >= offset:
            return "0" if first else "$"
        last = await cmd(self.client, "XREVRANGE", key, "+", "-", "COUNT", 1)
        if offset_of(last[0]) < offset:
            return "$"
        # The answer is the smallest id with an offset >= ``offset``; ``best`` is the smallest
        # such id seen, and ids in [low, high] are the ones not ruled out yet.
        best = id_number(last[0][0])
        low, high = id_number(first[0][0]), best - 1
        while low <= high:
            middle = (low + high) // 2
            probe = await cmd(self.client, "XRANGE", key, id_text(middle), "+", "COUNT", 1)
            found = id_number(probe[0][0])
            if offset_of(probe[0]) >= offset:
                best = min(best, found)
                high = middle - 1
            else:
                low = found + 1
        return id_before(best >> 64, best & MAX_SEQ)

    async def delete_group(self, stream: str, group: str) -> None:
        self._check_open()
        info = await self._stream(stream)
        validate_name(group, "group")
        if not await cmd(self.client, "HEXISTS", self.keys.groups(stream), group):
            raise GroupNotFoundError(f"no group named {group!r} on stream {stream!r}")
        async with self.client.pipeline(transaction=True) as pipe:
            for p in range(info.partitions):
                pipe.execute_command("XGROUP", "DESTROY", self.keys.partition(stream, p), group)
            pipe.delete(*self._group_keys(stream, group, info.partitions))
            pipe.hdel(self.keys.groups(stream), group)
            await pipe.execute(raise_on_error=False)

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        self._check_open()
        info = await self._stream(stream)
        validate_name(group, "group")
        if not await cmd(self.client, "HEXISTS", self.keys.groups(stream), group):
            raise GroupNotFoundError(f"no group named {group!r} on stream {stream!r}")
        keys = [self.keys.meta(stream), self.keys.delayed(stream, group)]
        for p in range(info.partitions):
            keys += [self.keys.partition(stream, p), self.keys.lock(stream, group, p)]
        rows = await self.scripts["lag"](keys=keys, args=[group])
        out = []
        for p, (head, committed, next_offset, in_pel, waiting, holder) in enumerate(rows):
            head, committed, next_offset = int(head), int(committed), int(next_offset)
            owner = holder.decode().rsplit("/", 1)[0] if holder else None
            out.append(
                PartitionLag(
                    partition=p,
                    head=head,
                    committed=committed,
                    lag=head - committed,
                    pending=max(0, head - next_offset),
                    in_flight=int(in_pel),
                    waiting=int(waiting),
                    owner=owner,
                )
            )
        return out

    # -- dead letters ---------------------------------------------------------------------------

    async def _dead_letter(
        self, stream: str, group: str, original: Message, count: int, failures: Failures
    ) -> None:
        name = dead_letter_name(stream, group)
        subject = dead_letter_subject(stream, group)
        if name not in self._streams:
            # Created on first use; create it beforehand to give it its own retention.
            await self.create_stream(StreamSpec(name, (subject,)))
        letter = dead_letter_message(original, group, count, failures, subject)
        await self._publish(subject, letter.payload, letter.key, letter.headers, letter.id, None, core=False)

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        self._check_open()
        await self._stream(stream)
        validate_name(group, "group")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise InvalidConfigError(f"max_messages must be a positive integer, not {max_messages!r}")
        name = dead_letter_name(stream, group)
        try:
            dead_letters = await self._stream(name)
        except StreamNotFoundError:
            return []
        out: list[Message] = []
        for p in range(dead_letters.partitions):
            key = self.keys.partition(name, p)
            for entry_id, fields in await cmd(self.client, "XRANGE", key, "-", "+", "COUNT", max_messages):
                out.append(entry_message(name, p, entry_id, fields))
        out.sort(key=lambda m: m.timestamp)
        return out[:max_messages]
