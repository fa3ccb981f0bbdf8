"""What a JetStream consumer has beyond its engine group: filters, ephemerality, creation time,
ack policy.

The engine's group configuration has no room for these, and a filtered consumer revived
unfiltered after a restart would deliver what it must not, so they live in one JSON file
next to the engine's data, rewritten atomically on every change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...engine.partition import write_atomically

__all__ = ["ConsumerMeta", "MetaStore"]


@dataclass(frozen=True)
class ConsumerMeta:
    filters: tuple[str, ...] = ()
    ephemeral: bool = False
    inactive_threshold_s: float | None = None
    created_ns: int = 0
    ack_policy: str = "explicit"  # "all" and "none" settle in the consumer, not the group


class MetaStore:
    """``(stream, consumer) -> ConsumerMeta``, persisted in ``<engine path>/jetstream/consumers.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], ConsumerMeta] = {}
        if path.exists():
            for key, value in json.loads(path.read_bytes()).items():
                stream, _, name = key.partition(" ")
                value["filters"] = tuple(value["filters"])
                self.entries[(stream, name)] = ConsumerMeta(**value)

    def get(self, stream: str, name: str) -> ConsumerMeta | None:
        return self.entries.get((stream, name))

    def put(self, stream: str, name: str, meta: ConsumerMeta) -> None:
        self.entries[(stream, name)] = meta
        self._save()

    def drop(self, stream: str, name: str | None = None) -> None:
        """Forget one consumer, or (``name`` None) every consumer of the stream."""
        keys = [k for k in self.entries if k[0] == stream and name in (None, k[1])]
        for key in keys:
            del self.entries[key]
        if keys:
            self._save()

    def _save(self) -> None:
        # Stream and consumer names cannot hold a space, so "stream name" is a safe key.
        data = {f"{s} {n}": asdict(m) for (s, n), m in self.entries.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(data).encode())
