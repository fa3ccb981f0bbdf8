"""The consumer groups of an engine: creating, opening, finding and deleting them.

A group lives in ``streams/<stream>/groups/<group>/``: ``group.json`` (its configuration)
and its state log. Groups are opened with their stream when the engine opens.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

from ...errors import GroupExistsError, GroupNotFoundError, InvalidConfigError
from ...message import Message
from ..config import StreamConfig, validate_name
from ..partition import write_atomically
from ..stream import Stream
from .config import OrderedGroupConfig, SharedGroupConfig, config_from_json, config_to_json
from .deadletter import dead_letter_stream, dead_letter_subject
from .ordered import OrderedGroup
from .shared import SharedGroup
from .statelog import COMMIT, StateLog

Group = OrderedGroup | SharedGroup
EnsureStream = Callable[[StreamConfig], Awaitable[None]]
Publish = Callable[[Message], Awaitable[None]]


class Groups:
    def __init__(self, executor: Executor, ensure_stream: EnsureStream, publish: Publish) -> None:
        self._executor = executor
        self._ensure_stream = ensure_stream
        self._publish = publish
        self._groups: dict[tuple[str, str], Group] = {}
        # Opening a group awaits file work: two creations of one group at once (two members
        # joining together) must get the same group, never two writers on one state log.
        self._creating = asyncio.Lock()

    def _directory(self, stream: Stream, name: str) -> Path:
        return stream.directory / "groups" / name

    async def open_all(self, stream: Stream) -> None:
        """Open every group stored for ``stream`` (at engine start)."""
        root = stream.directory / "groups"
        if not root.is_dir():
            return
        for directory in sorted(root.iterdir()):
            config_file = directory / "group.json"
            if config_file.exists():
                config = config_from_json(json.loads(config_file.read_bytes()))
                await self._open(stream, config, new=False)

    async def create(self, stream: Stream, config: OrderedGroupConfig | SharedGroupConfig) -> Group:
        """Create the group, or return it when it exists with the same configuration."""
        if not isinstance(config, OrderedGroupConfig | SharedGroupConfig):
            raise InvalidConfigError(
                f"a group needs an OrderedGroupConfig or SharedGroupConfig, not {type(config).__name__}"
            )
        async with self._creating:
            existing = self._groups.get((stream.name, config.name))
            if existing is not None:
                if existing.config != config:
                    raise GroupExistsError(
                        f"group {config.name!r} on stream {stream.name!r} exists with a different "
                        "configuration"
                    )
                return existing
            if config.dead_letter:
                # Created now, not at the first failure: a name or subject the engine refuses
                # (say, a stream capturing '>') fails the group's creation instead of
                # stranding a message.
                await self._ensure_stream(dead_letter_stream(stream.config, config.name))
            return await self._open(stream, config, new=True)

    async def _open(
        self, stream: Stream, config: OrderedGroupConfig | SharedGroupConfig, *, new: bool
    ) -> Group:
        directory = self._directory(stream, config.name)
        loop = asyncio.get_running_loop()
        if new:
            await loop.run_in_executor(self._executor, _prepare, directory)
        state, snapshot, events = await loop.run_in_executor(
            self._executor, StateLog.open, directory, stream.config.durability
        )
        state.bind(self._executor)
        start_offsets = [partition.resolve(config.start) for partition in stream.partitions]
        sink = self._dead_letter_sink(stream.config, config.name) if config.dead_letter else None
        subject = dead_letter_subject(stream.name, config.name)
        group: Group
        if isinstance(config, OrderedGroupConfig):
            group = OrderedGroup(stream, config, state, sink, subject, start_offsets)
        else:
            group = SharedGroup(stream, config, state, sink, subject, start_offsets)
        if new:
            # Where a new group starts is fixed now, so "latest" means latest at creation.
            for p, offset in enumerate(start_offsets):
                state.record(COMMIT, p, offset)
            await state.flush(sync=True)
            # Written last: a folder without it is a creation that did not finish.
            data = json.dumps(config_to_json(config)).encode()
            await loop.run_in_executor(self._executor, write_atomically, directory / "group.json", data)
        else:
            group.restore(snapshot, events)
        self._groups[(stream.name, config.name)] = group
        return group

    def _dead_letter_sink(self, stream: StreamConfig, group: str) -> Publish:
        config = dead_letter_stream(stream, group)

        async def send(message: Message) -> None:
            await self._ensure_stream(config)
            await self._publish(message)

        return send

    def get(self, stream: str, name: str) -> Group:
        group = self._groups.get((stream, name))
        if group is None:
            validate_name(name, "group")
            raise GroupNotFoundError(f"no group named {name!r} on stream {stream!r}")
        return group

    def names(self, stream: str) -> list[str]:
        return sorted(name for s, name in self._groups if s == stream)

    async def delete(self, stream: Stream, name: str) -> None:
        group = self.get(stream.name, name)
        del self._groups[(stream.name, name)]
        await group.close()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, shutil.rmtree, self._directory(stream, name), True
        )

    async def close_stream(self, stream: str) -> None:
        for s, name in [key for key in self._groups if key[0] == stream]:
            await self._groups.pop((s, name)).close()

    async def close(self) -> None:
        groups, self._groups = list(self._groups.values()), {}
        await asyncio.gather(*(group.close() for group in groups))


def _prepare(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)  # leftovers of a creation or deletion that did not finish
    directory.mkdir(parents=True)
