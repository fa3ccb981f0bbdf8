"""Snapshots: an aggregate's state at a version, so loading replays only the events after it.

A snapshot is a cache: losing one costs a longer replay, never correctness, so stores may
drop old ones. Two stores live here: a local folder (the default) and a last-value stream
of the embedded engine. `pigeon.es.s3` has one for S3-compatible object stores.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..engine import Engine, StreamConfig
from ..errors import InvalidConfigError, PigeonError
from .errors import SnapshotStoreError
from .store import check_token

__all__ = ["EngineSnapshotStore", "FolderSnapshotStore", "Snapshot", "SnapshotStore"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State after ``version`` events; ``timestamp`` is when the last of them was stored and
    ``state_version`` the aggregate class's `snapshot_version` when it was taken."""

    aggregate_type: str
    aggregate_id: str
    version: int
    timestamp: float
    state_version: int
    state: dict[str, Any]

    def to_bytes(self) -> bytes:
        try:
            return json.dumps(asdict(self), separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SnapshotStoreError(
                f"the state of {self.aggregate_type} {self.aggregate_id!r} is not JSON ({exc}): "
                "override snapshot_state and restore_state"
            ) from None

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Snapshot:
        try:
            return cls(**json.loads(data))
        except (TypeError, ValueError) as exc:
            raise SnapshotStoreError(f"the snapshot in {where} cannot be read: {exc}") from None

    def fits(self, at_version: int | None, at_time: float | None) -> bool:
        return (at_version is None or self.version <= at_version) and (
            at_time is None or self.timestamp <= at_time
        )


class SnapshotStore(Protocol):
    async def save(self, snapshot: Snapshot) -> None: ...

    async def latest(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        at_version: int | None = None,
        at_time: float | None = None,
    ) -> Snapshot | None:
        """The newest snapshot at or before ``at_version`` and ``at_time`` (None: none kept)."""
        ...


class FolderSnapshotStore:
    """Snapshots as JSON files, ``<root>/<type>/<id>/<version>.json``; the newest ``keep`` per
    aggregate are kept (None: all, so time travel to any point starts from a snapshot)."""

    def __init__(self, root: str | os.PathLike[str], *, keep: int | None = None) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise InvalidConfigError(f"keep must be a positive integer or None, not {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def _folder(self, aggregate_type: str, aggregate_id: str) -> Path:
        return self.root / aggregate_path(aggregate_type, aggregate_id)

    async def save(self, snapshot: Snapshot) -> None:
        folder = self._folder(snapshot.aggregate_type, snapshot.aggregate_id)
        await asyncio.to_thread(self._write, folder, snapshot.version, snapshot.to_bytes())

    def _write(self, folder: Path, version: int, data: bytes) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{version:020d}.json.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, folder / f"{version:020d}.json")
            if self.keep is not None:
                for old in sorted(folder.glob("*.json"))[: -self.keep]:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            raise SnapshotStoreError(f"cannot write a snapshot in {folder}: {exc}") from None

    async def latest(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        at_version: int | None = None,
        at_time: float | None = None,
    ) -> Snapshot | None:
        folder = self._folder(aggregate_type, aggregate_id)
        return await asyncio.to_thread(self._find, folder, at_version, at_time)

    def _find(self, folder: Path, at_version: int | None, at_time: float | None) -> Snapshot | None:
        try:
            names = sorted((p.name for p in folder.glob("*.json")), reverse=True)
        except OSError as exc:
            raise SnapshotStoreError(f"cannot list snapshots in {folder}: {exc}") from None
        for name in names:
            if at_version is not None and int(name.removesuffix(".json")) > at_version:
                continue
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                continue  # removed by a writer keeping fewer
            snapshot = Snapshot.from_bytes(data, str(folder / name))
            if snapshot.fits(at_version, at_time):
                return snapshot
        return None


class EngineSnapshotStore:
    """The latest snapshot per aggregate in a stream of the embedded engine that keeps one
    message per subject; time travel to before it replays from the start."""

    def __init__(self, engine: Engine, stream: str) -> None:
        self.engine = engine
        self.stream = stream

    @classmethod
    async def open(cls, engine: Engine, stream: str = "snapshots") -> EngineSnapshotStore:
        config = StreamConfig(stream, (f"{stream}.>",), max_msgs_per_subject=1)
        try:
            await engine.create_stream(config)
        except PigeonError as exc:
            raise SnapshotStoreError(f"stream {stream!r} cannot hold snapshots: {exc}") from None
        return cls(engine, stream)

    def _subject(self, aggregate_type: str, aggregate_id: str) -> str:
        return f"{self.stream}.{aggregate_path(aggregate_type, aggregate_id).replace('/', '.')}"

    async def save(self, snapshot: Snapshot) -> None:
        subject = self._subject(snapshot.aggregate_type, snapshot.aggregate_id)
        await self.engine.publish(subject, snapshot.to_bytes(), key=snapshot.aggregate_id)

    async def latest(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        at_version: int | None = None,
        at_time: float | None = None,
    ) -> Snapshot | None:
        subject = self._subject(aggregate_type, aggregate_id)
        message = self.engine.last_message(self.stream, subject)
        if message is None:
            return None
        snapshot = Snapshot.from_bytes(message.payload, f"{self.stream} at offset {message.offset}")
        return snapshot if snapshot.fits(at_version, at_time) else None


def aggregate_path(aggregate_type: str, aggregate_id: str) -> str:
    """``type/id``, both checked: they become file names, object keys and subject tokens."""
    return f"{check_token('aggregate type', aggregate_type)}/{check_token('aggregate id', aggregate_id)}"
