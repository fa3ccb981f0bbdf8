"""The embedded broker: a data folder of streams, owned by one process at a time.

Layout of a data folder::

    LOCK                          flock()ed by the owner, holds its PID
    streams/<name>/stream.json    the stream's configuration
    streams/<name>/p<N>/          one folder per partition: segments and state.json
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    DataDirLockedError,
    EngineClosedError,
    GroupExistsError,
    GroupHasMembersError,
    InvalidConfigError,
    InvalidMessageError,
    NoStreamForSubjectError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
)
from ..message import Message
from ..subjects import SubjectIndex, patterns_overlap, validate_subject
from .config import DEFAULT_MAX_MESSAGE_BYTES, StartAt, StreamConfig, validate_name
from .groups.config import OrderedGroupConfig, SharedGroupConfig
from .groups.lag import PartitionLag
from .groups.manager import Groups
from .groups.ordered import OrderedGroup
from .groups.shared import SharedGroup
from .partition import write_atomically
from .stream import BatchAck, Expect, PubAck, Stream


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    first_offset: int
    next_offset: int
    messages: int
    bytes: int
    segments: int
    last_timestamp: float | None


@dataclass(frozen=True, slots=True)
class StreamInfo:
    config: StreamConfig
    partitions: tuple[PartitionInfo, ...]

    @property
    def messages(self) -> int:
        return sum(p.messages for p in self.partitions)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)


class Engine:
    """The embedded durable broker. Open with ``await Engine.open(path)``; close when done."""

    def __init__(self, path: Path, max_message_bytes: int, retention_interval_s: float) -> None:
        self.path = path
        self.max_message_bytes = max_message_bytes
        self._retention_interval_s = retention_interval_s
        self._streams: dict[str, Stream] = {}
        self._routes: SubjectIndex[Stream] = SubjectIndex()
        self._route_cache: dict[str, Stream | None] = {}
        # Creations await file work: two of one name at once must not both create it.
        self._creating = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pigeon-io")
        self._lock_fd: int | None = None
        self._closed = False
        self._housekeeping: asyncio.Task[None] | None = None
        self._groups = Groups(self._executor, self._ensure_stream, self._publish_one_message)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retention_interval_s: float = 1.0,
    ) -> Engine:
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or not (1 <= max_message_bytes <= 64 * 1024 * 1024)
        ):
            raise InvalidConfigError(
                f"max_message_bytes must be between 1 and 64 MiB, not {max_message_bytes!r}"
            )
        engine = cls(Path(path), max_message_bytes, retention_interval_s)
        try:
            await asyncio.get_running_loop().run_in_executor(engine._executor, engine._open_files)
        except BaseException:
            engine._release()
            raise
        for stream in engine._streams.values():
            stream.bind(engine._executor)
        try:
            for stream in engine._streams.values():
                await engine._groups.open_all(stream)
        except BaseException:
            await engine._groups.close()
            engine._release()
            raise
        engine._housekeeping = asyncio.get_running_loop().create_task(engine._run_housekeeping())
        return engine

    def _open_files(self) -> None:
        (self.path / "streams").mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        for directory in sorted((self.path / "streams").iterdir()):
            config_file = directory / "stream.json"
            if not config_file.exists():
                continue  # a stream whose creation did not finish
            config = StreamConfig.from_json(json.loads(config_file.read_bytes()))
            self._add(Stream.open(config, directory, self.max_message_bytes))

    def _acquire_lock(self) -> None:
        lock_path = self.path / "LOCK"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = int(owner) if owner.isdigit() else None
            raise DataDirLockedError(
                f"data folder {self.path} is in use by process {owner or 'unknown'}; "
                "reach it through that process's `pigeon serve`, or stop it first",
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        self._executor.shutdown(wait=True)

    async def close(self) -> None:
        """Flush and fsync everything, write checkpoints, release the folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        try:
            await self._groups.close()
            await asyncio.gather(*(s.close() for s in self._streams.values()))
        finally:
            self._release()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"the engine on {self.path} is closed")

    async def _run_housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self._retention_interval_s)
            now = time.time_ns()
            for stream in list(self._streams.values()):
                stream.apply_retention(now)

    # -- streams -------------------------------------------------------------------------------

    def _add(self, stream: Stream) -> None:
        self._streams[stream.name] = stream
        for pattern in stream.config.subjects:
            self._routes.add(pattern, stream)
        self._route_cache.clear()

    async def create_stream(self, config: StreamConfig) -> StreamInfo:
        """Create a stream; creating one that exists with the same configuration is a no-op."""
        self._check_open()
        if not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"create_stream takes a StreamConfig, not {type(config).__name__}")
        async with self._creating:
            existing = self._streams.get(config.name)
            if existing is not None:
                if existing.config != config:
                    raise StreamExistsError(f"stream {config.name!r} exists with a different configuration")
                return self.stream_info(config.name)
            self._check_overlap(config)
            directory = self.path / "streams" / config.name
            loop = asyncio.get_running_loop()
            stream = await loop.run_in_executor(self._executor, self._create_files, config, directory)
            stream.bind(self._executor)
            self._add(stream)
            return self.stream_info(config.name)

    def _create_files(self, config: StreamConfig, directory: Path) -> Stream:
        if directory.exists():
            shutil.rmtree(directory)  # leftovers of a creation or deletion that did not finish
        stream = Stream.open(config, directory, self.max_message_bytes)
        write_atomically(directory / "stream.json", json.dumps(config.to_json()).encode())
        return stream

    async def update_stream(self, config: StreamConfig) -> StreamInfo:
        """Change a stream's subjects, retention limits, discard policy, dedup window or
        metadata; the new limits apply to stored data at once. How it is stored (partitions,
        durability, segments) is fixed at creation: `InvalidConfigError` names what cannot change."""
        self._check_open()
        if not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"update_stream takes a StreamConfig, not {type(config).__name__}")
        stream = self._stream(config.name)
        old = stream.config
        for fixed in _FIXED_AT_CREATION:
            if getattr(config, fixed) != getattr(old, fixed):
                raise InvalidConfigError(
                    f"stream {config.name!r}: {fixed.replace('_', ' ')} cannot be changed "
                    f"({getattr(old, fixed)!r} to {getattr(config, fixed)!r}); create a new stream"
                )
        self._check_overlap(config, ignore=config.name)
        loop = asyncio.get_running_loop()
        data = json.dumps(config.to_json()).encode()
        await loop.run_in_executor(self._executor, write_atomically, stream.directory / "stream.json", data)
        for pattern in old.subjects:
            self._routes.remove(pattern, stream)
        stream.reconfigure(config)
        for pattern in config.subjects:
            self._routes.add(pattern, stream)
        self._route_cache.clear()
        stream.apply_retention(time.time_ns())
        return self.stream_info(config.name)

    def _check_overlap(self, config: StreamConfig, *, ignore: str | None = None) -> None:
        for other in self._streams.values():
            if other.name == ignore:
                continue
            for mine in config.subjects:
                for theirs in other.config.subjects:
                    if patterns_overlap(mine, theirs):
                        raise SubjectOverlapError(
                            f"stream {config.name!r} subject {mine!r} overlaps {theirs!r} "
                            f"of stream {other.name!r}"
                        )

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        stream = self._stream(name)
        del self._streams[name]
        for pattern in stream.config.subjects:
            self._routes.remove(pattern, stream)
        self._route_cache.clear()
        await self._groups.close_stream(name)
        await stream.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _remove_stream_files, stream.directory)

    async def purge_stream(self, name: str) -> None:
        """Remove every message of a stream; offsets continue where they were."""
        self._check_open()
        self._stream(name).purge()

    def streams(self) -> list[str]:
        self._check_open()
        return sorted(self._streams)

    def _stream(self, name: str) -> Stream:
        stream = self._streams.get(name)
        if stream is None:
            validate_name(name)
            raise StreamNotFoundError(f"no stream named {name!r}")
        return stream

    def stream_info(self, name: str) -> StreamInfo:
        self._check_open()
        stream = self._stream(name)
        return StreamInfo(
            stream.config,
            tuple(
                PartitionInfo(
                    partition=p.number,
                    first_offset=p.first_offset,
                    next_offset=p.next_offset,
                    messages=p.total_msgs,
                    bytes=p.total_bytes,
                    segments=len(p.segments),
                    last_timestamp=p.last_timestamp_ns / 1e9 if p.last_timestamp_ns else None,
                )
                for p in stream.partitions
            ),
        )

    def subject_count(self, name: str) -> int:
        """How many distinct subjects the retained messages of a stream have."""
        self._check_open()
        partitions = self._stream(name).partitions
        if len(partitions) == 1:
            return len(partitions[0].last_by_subject)
        return len(set().union(*(p.last_by_subject for p in partitions)))

    def stream_for_subject(self, subject: str) -> Stream:
        stream = self._route_cache.get(subject)
        if stream is None:
            validate_subject(subject)
            found = self._routes.match(subject)
            if not found:
                raise NoStreamForSubjectError(f"no stream captures subject {subject!r}")
            stream = found[0]
            if len(self._route_cache) > 65536:
                self._route_cache.clear()
            self._route_cache[subject] = stream
        return stream

    # -- publishing ----------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        expect: Expect | None = None,
    ) -> PubAck:
        """Store one message in the stream that captures ``subject``.

        Returns once the record is written under the stream's durability policy.
        """
        self._check_open()
        stream = self.stream_for_subject(subject)
        _check_fields(payload, key, msg_id)
        return await stream.publish_one(subject, payload, key, _headers(headers), msg_id, expect)

    async def publish_many(
        self,
        subject: str,
        payloads: Sequence[bytes],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> BatchAck:
        """Store many payloads on one subject, with one key and the same headers, as one atomic
        batch in one partition (bulk loads)."""
        self._check_open()
        stream = self.stream_for_subject(subject)
        if not payloads:
            raise InvalidConfigError("publish_many needs at least one payload")
        # By the distinct types, not payload by payload: this runs on every bulk publish.
        if not all(issubclass(kind, bytes) for kind in set(map(type, payloads))):
            raise InvalidMessageError("publish_many takes a sequence of bytes payloads")
        _check_fields(b"", key, None)
        return await stream.publish_many(subject, payloads, key, _headers(headers))

    async def publish_batch(self, messages: Sequence[Message], *, expect: Expect | None = None) -> BatchAck:
        """Store messages that all go to one stream; each partition's share is written atomically."""
        self._check_open()
        if not messages:
            raise InvalidConfigError("publish_batch needs at least one message")
        for message in messages:
            if not isinstance(message, Message):
                raise InvalidConfigError(f"publish_batch takes Message objects, not {message!r}")
        stream = self.stream_for_subject(messages[0].subject)
        for message in messages:
            if message._headers is not None and not isinstance(message._headers, dict):
                raise InvalidMessageError("message headers must be a dict of text to text")
            if (
                message.subject is not messages[0].subject
                and self.stream_for_subject(message.subject) is not stream
            ):
                raise InvalidConfigError(
                    f"one batch must go to one stream: {message.subject!r} is not captured by {stream.name!r}"
                )
            _check_fields(message.payload, message.key, message._id)
        return await stream.publish(messages, expect)

    # -- consumer groups ----------------------------------------------------------------------

    async def _ensure_stream(self, config: StreamConfig) -> None:
        if config.name not in self._streams:
            await self.create_stream(config)

    async def _publish_one_message(self, message: Message) -> None:
        await self.publish_batch([message])

    async def ordered_group(self, stream: str, config: OrderedGroupConfig) -> OrderedGroup:
        """Create (or open) an ordered consumer group on ``stream``; its state is durable."""
        self._check_open()
        group = await self._groups.create(self._stream(stream), config)
        if not isinstance(group, OrderedGroup):
            raise GroupExistsError(f"group {config.name!r} on stream {stream!r} is a shared group")
        return group

    async def shared_group(self, stream: str, config: SharedGroupConfig) -> SharedGroup:
        """Create (or open) a shared consumer group on ``stream``; its state is durable."""
        self._check_open()
        group = await self._groups.create(self._stream(stream), config)
        if not isinstance(group, SharedGroup):
            raise GroupExistsError(f"group {config.name!r} on stream {stream!r} is an ordered group")
        return group

    def group(self, stream: str, name: str) -> OrderedGroup | SharedGroup:
        self._check_open()
        self._stream(stream)
        return self._groups.get(stream, name)

    def groups(self, stream: str) -> list[str]:
        self._check_open()
        self._stream(stream)
        return self._groups.names(stream)

    async def delete_group(self, stream: str, name: str) -> None:
        self._check_open()
        await self._groups.delete(self._stream(stream), name)

    def group_lag(self, stream: str, name: str) -> list[PartitionLag]:
        """Per partition: head offset minus committed offset, and what is pending or in flight."""
        return self.group(stream, name).lag()

    async def reset_group_offsets(self, stream: str, name: str, start: StartAt) -> None:
        """Move a group to ``start`` (only while it has no members).

        An ordered group moves its committed offsets. A shared group's progress is per
        message, so it starts over: it is made again with the same configuration and the new
        start, forgetting its leases and pending redeliveries (its dead letters stay).
        """
        group = self.group(stream, name)
        if isinstance(group, OrderedGroup):
            await group.reset_offsets(start)
            return
        if group.member_names():
            raise GroupHasMembersError(
                f"group {name!r} has members {group.member_names()}: it can only be reset while it has none"
            )
        config = dataclasses.replace(group.config, start=start)
        await self.delete_group(stream, name)
        await self.shared_group(stream, config)

    # -- reading ------------------------------------------------------------------------------

    def _partition(self, stream: str, partition: int):  # type: ignore[no-untyped-def]
        self._check_open()
        s = self._stream(stream)
        if (
            isinstance(partition, bool)
            or not isinstance(partition, int)
            or not (0 <= partition < len(s.partitions))
        ):
            raise InvalidConfigError(
                f"stream {stream!r} has partitions 0 to {len(s.partitions) - 1}, not {partition!r}"
            )
        return s.partitions[partition]

    def resolve(self, stream: str, partition: int, start: StartAt) -> int:
        """The offset a read starting at ``start`` begins at."""
        return int(self._partition(stream, partition).resolve(start))

    def fetch(
        self,
        stream: str,
        partition: int,
        offset: int,
        max_messages: int = 100,
        max_bytes: int | None = None,
    ) -> list[Message]:
        """Up to ``max_messages`` messages from ``offset`` on; empty at the end of the log."""
        return list(self._partition(stream, partition).fetch(offset, max_messages, max_bytes))

    async def read(
        self, stream: str, partition: int, start: StartAt | None = None, *, batch: int = 1000
    ) -> AsyncIterator[Message]:
        """Every message from ``start`` (default earliest) to the current end, streamed from disk."""
        offset = self.resolve(stream, partition, start or StartAt.earliest())
        p = self._partition(stream, partition)
        while True:
            messages = p.fetch(offset, batch)
            if not messages:
                return
            for message in messages:
                yield message
            offset = messages[-1].offset + 1
            await asyncio.sleep(0)  # let other tasks run between chunks
            self._check_open()

    async def wait_for_data(self, stream: str, partition: int, offset: int, timeout: float | None) -> bool:
        """Wait until a message at ``offset`` or later exists (long polling); False on timeout."""
        return bool(await self._partition(stream, partition).wait_for_data(offset, timeout))

    def last_message(self, stream: str, subject: str) -> Message | None:
        """The newest retained message on ``subject`` in ``stream`` (any partition), or None."""
        self._check_open()
        validate_subject(subject)
        best: Message | None = None
        for p in self._stream(stream).partitions:
            offset = p.last_by_subject.get(subject)
            if offset is None:
                continue
            found = p.fetch(offset, 1)
            if (
                found
                and found[0].subject == subject
                and (best is None or found[0].timestamp > best.timestamp)
            ):
                best = found[0]
        return best


# How a stream is stored: fixed when it is created.
_FIXED_AT_CREATION = (
    "partitions",
    "durability",
    "fsync_interval_ms",
    "segment_bytes",
    "segment_age_s",
    "max_msgs_per_subject",
)


def _headers(headers: object) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(f"headers must be a mapping of text to text, not {type(headers).__name__}")
    return dict(headers) if headers else None


def _check_fields(payload: object, key: object, msg_id: object) -> None:
    if not isinstance(payload, bytes):
        raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
    if key is not None and not isinstance(key, str):
        raise InvalidMessageError(f"key must be text, not {type(key).__name__}")
    if msg_id is not None and not isinstance(msg_id, str):
        raise InvalidMessageError(f"message id must be text, not {type(msg_id).__name__}")


def _remove_stream_files(directory: Path) -> None:
    # Remove the configuration first: a crash midway leaves a folder that opening skips.
    (directory / "stream.json").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
