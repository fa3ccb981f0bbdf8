"""The schema registry: subjects, versions and global ids, with Confluent's rules.

``SchemaRegistry.open(engine)`` replays the log into a :class:`RegistryState`. Every change is
checked, appended to the log and then applied, one at a time (a lock), so the state in memory is
always what a replay would rebuild. Reading never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from . import errors
from .compatibility import DEFAULT_LEVEL, LEVELS, Previous, problems
from .formats import SchemaFormat, get_format
from .log import RegistryLog
from .state import Reference, RegistryState, SchemaEntry, VersionEntry
from .versions import LATEST, VersionId

__all__ = ["MODES", "Candidate", "SchemaRegistry"]

MODES = ("READWRITE", "READONLY", "IMPORT")
DEFAULT_MODE = "READWRITE"

log = logging.getLogger("pigeon.registry")


@dataclass(frozen=True)
class Candidate:
    """A schema as a request gives it, before it is checked."""

    schema: str
    schema_type: str | None = None
    references: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class _Parsed:
    schema_format: SchemaFormat
    parsed: Any
    text: str
    references: tuple[Reference, ...]

    @property
    def key(self) -> tuple[str, str, tuple[Reference, ...]]:
        return (self.schema_format.type_name, self.text, self.references)


class SchemaRegistry:
    def __init__(self, log_: RegistryLog, state: RegistryState) -> None:
        self._log = log_
        self._state = state
        self._parsed: dict[int, Any] = {}
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, engine: Engine) -> SchemaRegistry:
        registry_log = RegistryLog(engine)
        state = RegistryState()
        async for event in registry_log.replay():
            try:
                state.apply(event)
            except (KeyError, TypeError, ValueError) as error:
                log.warning("skipping malformed registry event %r: %s", event, error)
        return cls(registry_log, state)

    # -- reading -------------------------------------------------------------------------------

    def schema(self, schema_id: int) -> SchemaEntry:
        """The schema with this id while any version (soft-deleted included) still uses it."""
        if not self._state.live_versions_of(schema_id, deleted=True):
            raise errors.SchemaNotFoundError(f"Schema {schema_id} not found")
        return self._state.schemas[schema_id]

    def usages(self, schema_id: int, *, deleted: bool = False) -> list[VersionEntry]:
        self.schema(schema_id)
        return self._state.live_versions_of(schema_id, deleted=deleted)

    def subjects(self, *, deleted: bool = False, prefix: str = "") -> list[str]:
        return [
            subject
            for subject in sorted(self._state.subjects)
            if subject.startswith(prefix) and self._state.versions(subject, deleted=deleted)
        ]

    def versions(self, subject: str, *, deleted: bool = False) -> list[VersionEntry]:
        found = self._state.versions(subject, deleted=deleted)
        if not found:
            raise errors.SubjectNotFoundError(f"Subject '{subject}' not found.")
        return found

    def version(self, subject: str, version: VersionId, *, deleted: bool = False) -> VersionEntry:
        entries = self.versions(subject, deleted=deleted)
        if version is LATEST:
            return entries[-1]
        for entry in entries:
            if entry.version == version:
                return entry
        raise errors.VersionNotFoundError(f"Version {version} not found.")

    def referenced_by(self, subject: str, version: VersionId) -> list[int]:
        entry = self.version(subject, version, deleted=True)
        return sorted({referrer.schema_id for referrer in self._state.referrers(subject, entry.version)})

    def lookup(self, subject: str, candidate: Candidate, *, deleted: bool = False) -> VersionEntry:
        """The subject's version holding this schema (``POST /subjects/{subject}``)."""
        entries = self.versions(subject, deleted=deleted)
        parsed = self._parse(candidate)
        for entry in reversed(entries):
            if self._state.schemas[entry.schema_id].key == parsed.key:
                return entry
        raise errors.SchemaNotFoundError("Schema not found")

    # -- registering ---------------------------------------------------------------------------

    async def register(
        self,
        subject: str,
        candidate: Candidate,
        *,
        schema_id: int | None = None,
        version: int | None = None,
    ) -> VersionEntry:
        """Register under ``subject``; an identical live version is returned as it is."""
        _check_subject(subject)
        async with self._lock:
            mode = self.mode(subject, default_to_global=True)
            if mode == "READONLY":
                raise errors.OperationNotPermittedError(f"Subject '{subject}' is in read-only mode")
            if (schema_id is not None or version is not None) and mode != "IMPORT":
                raise errors.OperationNotPermittedError(
                    f"an id or version can only be given in IMPORT mode; subject '{subject}' is in {mode}"
                )
            parsed = self._parse(candidate)
            for entry in self._state.versions(subject):
                if self._state.schemas[entry.schema_id].key == parsed.key:
                    _check_import_id(schema_id, entry.schema_id)
                    return entry
            known_id = self._state.ids.get(parsed.key)
            if known_id is not None:
                _check_import_id(schema_id, known_id)
            elif schema_id is not None and schema_id in self._state.schemas:
                raise errors.IdDoesNotMatchError(f"schema id {schema_id} already belongs to another schema")
            if mode != "IMPORT":
                found = self._problems(subject, parsed, None, transitive_as_level=True)
                if found:
                    raise errors.IncompatibleSchemaError(
                        f"Schema being registered is incompatible with an earlier schema for subject "
                        f"'{subject}': {'; '.join(found)}"
                    )
            new_id = known_id or schema_id or self._state.next_id()
            new_version = self._new_version(subject, version)
            await self._append(
                {
                    "op": "register",
                    "subject": subject,
                    "version": new_version,
                    "id": new_id,
                    "type": parsed.schema_format.type_name,
                    "schema": parsed.text,
                    "references": [reference.to_json() for reference in parsed.references],
                }
            )
            self._parsed.setdefault(new_id, parsed.parsed)
            return self._state.subjects[subject][new_version]

    def _new_version(self, subject: str, wanted: int | None) -> int:
        taken = self._state.subjects.get(subject, {})
        if wanted is None:
            return max(taken, default=0) + 1
        if wanted in taken:
            raise errors.InvalidVersionError(f"subject '{subject}' already has a version {wanted}")
        return wanted

    def compatibility_problems(
        self, subject: str, candidate: Candidate, version: VersionId | None
    ) -> list[str]:
        """``POST /compatibility/subjects/{subject}/versions[/{version}]``: [] when compatible."""
        _check_subject(subject)
        if not self._state.versions(subject) and version not in (None, LATEST):
            raise errors.SubjectNotFoundError(f"Subject '{subject}' not found.")
        parsed = self._parse(candidate)
        return self._problems(subject, parsed, version, transitive_as_level=version is None)

    def _problems(
        self, subject: str, parsed: _Parsed, version: VersionId | None, *, transitive_as_level: bool
    ) -> list[str]:
        level = self.compatibility(subject, default_to_global=True)
        entries = self._state.versions(subject)
        if version is not None and entries:
            entries = [self.version(subject, version)]
        if not transitive_as_level:
            # Against one chosen version the level only says which direction to check.
            level = level.removesuffix("_TRANSITIVE")
        previous = [
            Previous(entry.version, self._state.schemas[entry.schema_id].schema_type, self._parsed_of(entry))
            for entry in entries
        ]
        return problems(level, parsed.schema_format, parsed.parsed, previous)

    # -- deleting ------------------------------------------------------------------------------

    async def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        async with self._lock:
            self._check_writable(subject)
            entries = self._state.versions(subject, deleted=True)
            if not entries:
                raise errors.SubjectNotFoundError(f"Subject '{subject}' not found.")
            live = [entry for entry in entries if not entry.deleted]
            if permanent and live:
                raise errors.SubjectNotSoftDeletedError(
                    f"Subject '{subject}' was not deleted first before being permanently deleted"
                )
            if not permanent and not live:
                raise errors.SubjectSoftDeletedError(
                    f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently"
                )
            targets = entries if permanent else live
            for entry in targets:
                self._check_unreferenced(entry)
            for entry in targets:
                await self._append(
                    {"op": "delete", "subject": subject, "version": entry.version, "permanent": permanent}
                )
            if permanent:
                for op in ("config", "mode"):
                    await self._append({"op": op, "subject": subject, "value": None})
            return [entry.version for entry in targets]

    async def delete_version(self, subject: str, version: VersionId, *, permanent: bool = False) -> int:
        async with self._lock:
            self._check_writable(subject)
            # A soft delete of "latest" means the latest live version; a numbered version is
            # looked up among the soft-deleted too, so deleting it twice says so.
            entry = self.version(subject, version, deleted=permanent or version is not LATEST)
            if entry.deleted != permanent:
                error = errors.VersionSoftDeletedError if entry.deleted else errors.VersionNotSoftDeletedError
                shown = f"Subject '{subject}' Version {entry.version}"
                raise error(
                    f"{shown} was soft deleted. Set permanent=true to delete permanently"
                    if entry.deleted
                    else f"{shown} was not deleted first before being permanently deleted"
                )
            self._check_unreferenced(entry)
            await self._append(
                {"op": "delete", "subject": subject, "version": entry.version, "permanent": permanent}
            )
            return entry.version

    def _check_unreferenced(self, entry: VersionEntry) -> None:
        referrers = [
            referrer
            for referrer in self._state.referrers(entry.subject, entry.version)
            if referrer.subject != entry.subject or referrer.version != entry.version
        ]
        if referrers:
            shown = ", ".join(f"'{r.subject}' version {r.version}" for r in referrers)
            raise errors.ReferenceExistsError(
                f"Subject '{entry.subject}' version {entry.version} is referenced by {shown}; "
                "delete those first"
            )

    def _check_writable(self, subject: str) -> None:
        if self.mode(subject, default_to_global=True) == "READONLY":
            raise errors.OperationNotPermittedError(f"Subject '{subject}' is in read-only mode")

    # -- configuration and mode ----------------------------------------------------------------

    def compatibility(self, subject: str | None = None, *, default_to_global: bool = False) -> str:
        return self._setting(
            self._state.compatibility, subject, default_to_global, DEFAULT_LEVEL, "compatibility"
        )

    async def set_compatibility(self, subject: str | None, level: object) -> str:
        if not isinstance(level, str) or level.upper() not in LEVELS:
            raise errors.InvalidCompatibilityError(
                f"Invalid compatibility level {level!r}: use one of {', '.join(LEVELS)}"
            )
        return await self._set("config", subject, level.upper())

    async def delete_compatibility(self, subject: str | None) -> str:
        previous = self.compatibility(subject)
        await self._set("config", subject, None)
        return previous

    def mode(self, subject: str | None = None, *, default_to_global: bool = False) -> str:
        return self._setting(self._state.modes, subject, default_to_global, DEFAULT_MODE, "mode")

    async def set_mode(self, subject: str | None, mode: object, *, force: bool = False) -> str:
        if not isinstance(mode, str) or mode.upper() not in MODES:
            raise errors.InvalidModeError(f"Invalid mode {mode!r}: use one of {', '.join(MODES)}")
        mode = mode.upper()
        if mode == "IMPORT" and not force:
            in_use = self._state.versions(subject, deleted=True) if subject else self._state.subjects
            if in_use:
                where = f"subject '{subject}'" if subject else "the registry"
                raise errors.OperationNotPermittedError(
                    f"Cannot import since {where} already has schemas; give force=true to switch anyway"
                )
        return await self._set("mode", subject, mode)

    async def delete_mode(self, subject: str | None) -> str:
        previous = self.mode(subject)
        await self._set("mode", subject, None)
        return previous

    def _setting(
        self,
        table: dict[str | None, str],
        subject: str | None,
        default_to_global: bool,
        default: str,
        what: str,
    ) -> str:
        if subject in table:
            return table[subject]
        if subject is not None and not default_to_global:
            error = (
                errors.SubjectCompatibilityNotConfiguredError
                if what == "compatibility"
                else errors.SubjectModeNotConfiguredError
            )
            raise error(f"Subject '{subject}' does not have subject-level {what} configured")
        return table.get(None, default)

    async def _set(self, op: str, subject: str | None, value: str | None) -> str:
        if subject is not None:
            _check_subject(subject)
        async with self._lock:
            await self._append({"op": op, "subject": subject, "value": value})
        return value or ""

    # -- helpers -------------------------------------------------------------------------------

    async def _append(self, event: dict[str, Any]) -> None:
        await self._log.append(event)
        self._state.apply(event)

    def _parse(self, candidate: Candidate) -> _Parsed:
        schema_format = get_format(candidate.schema_type)
        if not isinstance(candidate.schema, str) or not candidate.schema.strip():
            raise errors.InvalidSchemaError("the schema must be a non-empty string")
        references = tuple(self._resolve_reference(raw) for raw in candidate.references)
        texts = self._reference_texts(references)
        parsed = schema_format.parse(candidate.schema, texts)
        return _Parsed(schema_format, parsed, schema_format.canonical(parsed), references)

    def _resolve_reference(self, raw: Mapping[str, Any]) -> Reference:
        name, subject, version = raw.get("name"), raw.get("subject"), raw.get("version", -1)
        if not isinstance(name, str) or not isinstance(subject, str) or not name or not subject:
            raise errors.InvalidSchemaError(f"a reference needs a name and a subject: {dict(raw)!r}")
        if isinstance(version, bool) or not isinstance(version, int) or (version < 1 and version != -1):
            raise errors.InvalidSchemaError(f"reference {name!r}: version must be a positive integer or -1")
        try:
            entry = self.version(subject, LATEST if version == -1 else version)
        except (errors.SubjectNotFoundError, errors.VersionNotFoundError):
            shown = "latest version" if version == -1 else f"version {version}"
            raise errors.InvalidSchemaError(
                f"reference {name!r}: subject '{subject}' has no {shown} registered"
            ) from None
        return Reference(name, subject, entry.version)

    def _reference_texts(self, references: tuple[Reference, ...]) -> dict[str, str]:
        """Every reference, transitively, by name; a reference's own references come before it."""
        texts: dict[str, str] = {}

        def visit(refs: tuple[Reference, ...]) -> None:
            for reference in refs:
                if reference.name in texts:
                    continue
                entry = self._state.subjects[reference.subject][reference.version]
                schema = self._state.schemas[entry.schema_id]
                visit(schema.references)
                texts.setdefault(reference.name, schema.text)

        visit(references)
        return texts

    def _parsed_of(self, entry: VersionEntry) -> Any:
        if entry.schema_id not in self._parsed:
            schema = self._state.schemas[entry.schema_id]
            schema_format = get_format(schema.schema_type)
            texts = self._reference_texts(schema.references)
            self._parsed[entry.schema_id] = schema_format.parse(schema.text, texts)
        return self._parsed[entry.schema_id]


def _check_subject(subject: str) -> None:
    if not subject or not subject.isprintable() or len(subject) > 1024:
        raise errors.InvalidSubjectNameError(
            f"Invalid subject {subject!r}: use 1 to 1024 printable characters"
        )


def _check_import_id(wanted: int | None, existing: int) -> None:
    if wanted is not None and wanted != existing:
        raise errors.IdDoesNotMatchError(
            f"this schema is already registered with id {existing}, not {wanted}"
        )
