"""Streams and groups on JetStream: creating, deleting and inspecting them.

`StreamAdmin` is the base of `NatsTransport`: the connection and caches they share live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
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
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ...engine.config import validate_name
from ...errors import (
    GroupExistsError,
    GroupNotFoundError,
    InvalidConfigError,
    StreamExistsError,
    StreamNotFoundError,
    TransportClosedError,
)
from ..base import ConsumerSpec, PartitionLag, StreamSpec, StreamState
from ._codec import STREAM_NAME_IN_USE, jetstream_errors
from ._groups import spec_json
from ._options import (
    COORDINATION_ROOT,
    GROUP_DESCRIPTION,
    PARTITION_ROOT,
    RESERVED_ROOTS,
    STREAM_DESCRIPTION,
    Layout,
    NatsOptions,
    coordination_bucket,
    dead_letter_subject,
)


class StreamAdmin:
    """The connection, the caches every part of the transport uses, and stream management."""

    def __init__(self, nc: Client, options: NatsOptions) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=options.request_timeout_s)
        self.options = options
        self._closed = False
        self._layouts: dict[str, tuple[float, Layout]] = {}
        self._routes_until = 0.0  # when the routing table must be listed again
        self._dead_letter_streams: set[str] = set()

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise TransportClosedError("the NATS transport is closed")

    def _forget_routes(self) -> None:
        self._routes_until = 0.0
        self._layouts.clear()

    async def _layout(self, name: str, *, fresh: bool = False) -> Layout:
        now = time.monotonic()
        cached = self._layouts.get(name)
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        validate_name(name)
        with jetstream_errors(f"stream {name!r}"):
            info = await self.js.stream_info(name)
        layout = layout_of(info)
        self._layouts[name] = (now + self.options.route_cache_s, layout)
        return layout

    # -- streams ------------------------------------------------------------------------------------

    async def create_stream(self, spec: StreamSpec) -> None:
        self._check_open()
        if not isinstance(spec, StreamSpec):
            raise InvalidConfigError(f"create_stream takes a StreamSpec, not {type(spec).__name__}")
        _check_limits(spec)
        for pattern in spec.subjects:
            if pattern.startswith(RESERVED_ROOTS) or pattern.split(".")[0] in (
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
        with jetstream_errors(f"create stream {spec.name!r}"):
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
            with contextlib.suppress(StreamExistsError), jetstream_errors(f"create stream {name!r}"):
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
        layout = layout_of(info)
        if layout.partitions != spec.partitions or set(layout.subjects) != set(spec.subjects):
            raise StreamExistsError(
                f"stream {spec.name!r} exists with {layout.partitions} partition(s) capturing "
                f"{list(layout.subjects)}"
            )
        if layout.partitions > 1:
            with jetstream_errors(f"create stream {spec.name!r}"):
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
            with jetstream_errors(f"stream {name!r}"):
                return await self.js.stream_info(name)
        except StreamNotFoundError:
            return None

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        layout = await self._layout(name, fresh=True)
        groups = await self._group_names(layout.streams[0])
        with jetstream_errors(f"delete stream {name!r}"):
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

    async def _stream_infos(self) -> list[StreamInfo]:
        """Every JetStream stream on the server (``STREAM.LIST``, page by page)."""
        infos: list[StreamInfo] = []
        while True:
            answer = await self.js._api_request(
                "$JS.API.STREAM.LIST",
                json.dumps({"offset": len(infos)}).encode(),
                timeout=self.options.request_timeout_s,
            )
            page = answer.get("streams") or []
            infos += (StreamInfo.from_response(data) for data in page)
            if not page or len(infos) >= answer.get("total", 0):
                return infos

    async def list_streams(self) -> list[str]:
        """The streams pigeon created, dead-letter streams included: not the partitions'
        own streams, the ordered groups' buckets, nor streams of other applications."""
        self._check_open()
        with jetstream_errors("list streams"):
            infos = await self._stream_infos()
        return sorted(layout.name for layout in map(pigeon_layout, infos) if layout is not None)

    async def _purge_partitions(self, layout: Layout) -> list[int]:
        """Purge each partition's stream up to its last message; returns, per partition, the
        first sequence that survives (a publish racing the purge may land on either side)."""

        async def purge(stream: str) -> int:
            first_kept = (await self.js.stream_info(stream)).state.last_seq + 1
            await self.js.purge_stream(stream, seq=first_kept)
            return first_kept

        with jetstream_errors(f"purge stream {layout.name!r}"):
            return list(await asyncio.gather(*(purge(s) for s in layout.streams)))

    async def _group_names(self, stream: str) -> list[str]:
        with jetstream_errors(f"stream {stream!r}"):
            try:
                infos = await self.js.consumers_info(stream)
            except NotFoundError:
                return []
        return [i.name for i in infos if (i.config.description or "").startswith(GROUP_DESCRIPTION)]

    async def stream_state(self, name: str) -> StreamState:
        self._check_open()
        layout = await self._layout(name, fresh=True)
        with jetstream_errors(f"stream {name!r}"):
            infos = await asyncio.gather(*(self.js.stream_info(s) for s in layout.streams))
        return StreamState(
            name=name,
            subjects=layout.subjects,
            partitions=layout.partitions,
            messages=sum(i.state.messages for i in infos),
            last_offsets=tuple(i.state.last_seq - 1 for i in infos),
        )

    # -- groups -------------------------------------------------------------------------------------

    async def _coordination(self, layout: Layout, group: str) -> tuple[KeyValue, str, float]:
        bucket = coordination_bucket(layout.name, group)
        with jetstream_errors(f"group {group!r} on stream {layout.name!r}"):
            try:
                kv = await self.js.key_value(bucket)
            except BucketNotFoundError:
                try:
                    kv = await self.js.create_key_value(
                        KeyValueConfig(
                            bucket=bucket,
                            ttl=self.options.session_timeout_s,
                            history=1,
                            # On disk, so that a server restart does not look like a deleted group.
                            storage=StorageType.FILE,
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
            with jetstream_errors(f"group {spec.group!r} on stream {layout.name!r}"):
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
        with jetstream_errors(f"group {group!r} on stream {stream!r}"):
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
        with jetstream_errors(f"group {group!r} on stream {stream!r}"):
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


def layout_of(info: StreamInfo) -> Layout:
    config = info.config
    assert config.name is not None
    # A stream pigeon did not create (or a partition's own stream): one partition, as is.
    return pigeon_layout(info) or Layout.of(config.name, 1, tuple(config.subjects or ()))


def pigeon_layout(info: StreamInfo) -> Layout | None:
    """The layout of a stream pigeon's `create_stream` made; None for any other stream."""
    config = info.config
    description = config.description or ""
    if config.name is None or not description.startswith(STREAM_DESCRIPTION):
        return None
    try:
        data = json.loads(description[len(STREAM_DESCRIPTION) :])
        if "partitions" not in data:
            return None  # a partition's own stream: reached through its pigeon stream
        return Layout.of(config.name, int(data["partitions"]), tuple(data["subjects"]))
    except (ValueError, TypeError, KeyError):
        return None  # another application's description that merely starts like pigeon's


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
