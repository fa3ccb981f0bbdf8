"""The registry's state in memory, rebuilt by applying the log's events in order.

Nothing here does I/O or checks a request: :mod:`.registry` validates, appends an event to the
log, then applies it here, and opening replays the same events, so the two paths cannot differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Reference", "RegistryState", "SchemaEntry", "VersionEntry"]


@dataclass(frozen=True)
class Reference:
    """A named dependency on another subject's version (the name means what the format says)."""

    name: str
    subject: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True)
class SchemaEntry:
    id: int
    schema_type: str
    text: str  # the format's canonical text
    references: tuple[Reference, ...]

    @property
    def key(self) -> tuple[str, str, tuple[Reference, ...]]:
        return (self.schema_type, self.text, self.references)


@dataclass
class VersionEntry:
    subject: str
    version: int
    schema_id: int
    deleted: bool = False


@dataclass
class RegistryState:
    schemas: dict[int, SchemaEntry] = field(default_factory=dict)
    ids: dict[tuple[str, str, tuple[Reference, ...]], int] = field(default_factory=dict)
    subjects: dict[str, dict[int, VersionEntry]] = field(default_factory=dict)
    # Keyed by subject; None holds the global setting.
    compatibility: dict[str | None, str] = field(default_factory=dict)
    modes: dict[str | None, str] = field(default_factory=dict)

    def apply(self, event: dict[str, Any]) -> None:
        op = event["op"]
        if op == "register":
            self._register(event)
        elif op == "delete":
            self._delete(event["subject"], event["version"], event["permanent"])
        elif op in ("config", "mode"):
            table = self.compatibility if op == "config" else self.modes
            if event["value"] is None:
                table.pop(event["subject"], None)
            else:
                table[event["subject"]] = event["value"]
        else:
            raise ValueError(f"unknown registry event {op!r}")

    def _register(self, event: dict[str, Any]) -> None:
        references = tuple(Reference(**reference) for reference in event["references"])
        entry = SchemaEntry(event["id"], event["type"], event["schema"], references)
        self.schemas.setdefault(entry.id, entry)
        self.ids.setdefault(entry.key, entry.id)
        versions = self.subjects.setdefault(event["subject"], {})
        versions[event["version"]] = VersionEntry(event["subject"], event["version"], entry.id)

    def _delete(self, subject: str, version: int, permanent: bool) -> None:
        versions = self.subjects.get(subject, {})
        if version not in versions:
            return
        if permanent:
            del versions[version]
            if not versions:
                del self.subjects[subject]
        else:
            versions[version].deleted = True

    def next_id(self) -> int:
        return max(self.schemas, default=0) + 1

    def versions(self, subject: str, *, deleted: bool = False) -> list[VersionEntry]:
        """The subject's versions in order; soft-deleted ones only when ``deleted``."""
        entries = self.subjects.get(subject, {})
        return [entries[v] for v in sorted(entries) if deleted or not entries[v].deleted]

    def live_versions_of(self, schema_id: int, *, deleted: bool = False) -> list[VersionEntry]:
        return [
            entry
            for subject in sorted(self.subjects)
            for entry in self.versions(subject, deleted=deleted)
            if entry.schema_id == schema_id
        ]

    def referrers(self, subject: str, version: int) -> list[VersionEntry]:
        """Versions (soft-deleted included) whose schema references ``subject`` ``version``."""
        return [
            entry
            for name in sorted(self.subjects)
            for entry in self.versions(name, deleted=True)
            if any(
                (ref.subject, ref.version) == (subject, version)
                for ref in self.schemas[entry.schema_id].references
            )
        ]
