"""The embedded transport (``file://PATH``): pigeon's own engine, in this process.

Streams, groups, dead letters, dedup and lag are the engine's (`pigeon.engine`); core
pub/sub and request-reply are the in-process bus (`pigeon.transport.bus`). A publish goes
to both, as on NATS: matching core subscribers get it, and the stream capturing the subject
stores it. Only this process can reach the folder; other processes use ``pigeon serve``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..engine import Engine, OrderedGroupConfig, OrderedMember, SharedGroupConfig, SharedMember, StreamConfig
from ..engine.config import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_SEGMENT_BYTES, Durability
from ..engine.groups import PartitionLag, dead_letter_stream
from ..engine.stream import PubAck
from ..errors import InvalidConfigError, NoStreamForSubjectError
from ..message import Message
from .base import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    Received,
    StreamSpec,
    StreamState,
    Subscription,
    Transport,
)
from .bus import Bus, BusOptions


@dataclass(frozen=True)
class EmbeddedOptions:
    """Settings of the embedded transport. ``durability`` applies to streams it creates."""

    durability: Durability = "interval"
    fsync_interval_ms: int = 100
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    bus: BusOptions = field(default_factory=BusOptions)


FULL = Capabilities(
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
)


class EmbeddedConsumer(Consumer):
    def __init__(self, member: OrderedMember | SharedMember) -> None:
        self.member = member

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Received]:
        return await self.member.fetch(max_messages, timeout)

    async def close(self) -> None:
        await self.member.leave()


class EmbeddedTransport(Transport):
    name = "embedded"
    capabilities = FULL

    def __init__(self, engine: Engine, options: EmbeddedOptions) -> None:
        self.engine = engine
        self.options = options
        self.bus = Bus(options.bus)

    @classmethod
    async def open(cls, url: str, options: Any = None) -> EmbeddedTransport:
        options = _options(options, EmbeddedOptions)
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.scheme else url
        if not path:
            raise InvalidConfigError(f"file:// URL {url!r} names no folder: use file://PATH")
        engine = await Engine.open(Path(path), max_message_bytes=options.max_message_bytes)
        return cls(engine, options)

    async def close(self) -> None:
        await self.bus.close()
        await self.engine.close()

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        ack = None
        # A subject no stream captures is core only, as on NATS.
        with contextlib.suppress(NoStreamForSubjectError):
            ack = await self.engine.publish(subject, payload, key=key, headers=headers, msg_id=msg_id)
        if (ack is None or not ack.duplicate) and self.bus.has_subscribers(subject):
            await self.bus.publish(Message(subject, payload, key=key, headers=headers, id=msg_id))
        return ack

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        return self.bus.subscribe(pattern, queue)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 1.0,
    ) -> Message:
        return await self.bus.request(subject, payload, headers, timeout)

    async def create_stream(self, spec: StreamSpec) -> None:
        await self.engine.create_stream(self._stream_config(spec))

    def _stream_config(self, spec: StreamSpec) -> StreamConfig:
        return StreamConfig(
            name=spec.name,
            subjects=spec.subjects,
            partitions=spec.partitions,
            durability=self.options.durability,
            fsync_interval_ms=self.options.fsync_interval_ms,
            max_age_s=spec.max_age_s,
            max_msgs=spec.max_msgs,
            max_bytes=spec.max_bytes,
            dedup_window_s=spec.dedup_window_s,
            segment_bytes=self.options.segment_bytes,
        )

    async def delete_stream(self, name: str) -> None:
        letters = [f"{name}-{group}-dlq" for group in self.engine.groups(name)]
        await self.engine.delete_stream(name)
        for letter in letters:
            if letter in self.engine.streams():
                await self.engine.delete_stream(letter)

    async def stream_state(self, name: str) -> StreamState:
        info = self.engine.stream_info(name)
        return StreamState(
            name=name,
            subjects=info.config.subjects,
            partitions=info.config.partitions,
            messages=info.messages,
            last_offsets=tuple(p.next_offset - 1 for p in info.partitions),
        )

    async def list_streams(self) -> list[str]:
        return self.engine.streams()

    async def purge_stream(self, name: str) -> None:
        await self.engine.purge_stream(name)

    async def consumer(self, stream: str, spec: ConsumerSpec, *, member: str | None = None) -> Consumer:
        if spec.kind == "ordered":
            ordered = await self.engine.ordered_group(
                stream,
                OrderedGroupConfig(
                    spec.group,
                    start=spec.start,
                    max_deliver=spec.max_deliver,
                    backoff=spec.backoff,
                    dead_letter=spec.dead_letter,
                ),
            )
            return EmbeddedConsumer(await ordered.join(member))
        shared = await self.engine.shared_group(
            stream,
            SharedGroupConfig(
                spec.group,
                start=spec.start,
                ack_wait_s=spec.ack_wait_s,
                max_deliver=spec.max_deliver,
                backoff=spec.backoff,
                max_ack_pending=spec.max_ack_pending,
                key_ordered=spec.key_ordered,
                dead_letter=spec.dead_letter,
            ),
        )
        return EmbeddedConsumer(shared.member(member))

    async def delete_group(self, stream: str, group: str) -> None:
        await self.engine.delete_group(stream, group)

    async def lag(self, stream: str, group: str) -> list[PartitionLag]:
        return self.engine.group_lag(stream, group)

    async def read_dead_letters(self, stream: str, group: str, max_messages: int = 100) -> list[Message]:
        name = dead_letter_stream(self.engine.stream_info(stream).config, group).name
        if name not in self.engine.streams():
            return []
        return self.engine.fetch(name, 0, 0, max_messages)


def _options(options: Any, cls: type[Any]) -> Any:
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise InvalidConfigError(f"options must be a {cls.__name__}, not {type(options).__name__}")
    return options
