"""An asynchronous client of a Confluent-compatible schema registry (pigeon's or Confluent's).

What the serializers need and no more: register or look up a schema under a subject, and fetch
a schema by id. Ids never change meaning, so schemas by id are cached for the client's life;
so are the ids of schemas already registered or looked up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from . import errors

__all__ = ["RegisteredSchema", "RegistryClient", "SchemaReference"]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Confluent's codes for what a caller can be told precisely; any other refusal is a RegistryError.
_ERRORS: Mapping[int, type[errors.RegistryError]] = {
    cls.error_code: cls
    for cls in (
        errors.InvalidSchemaError,
        errors.SubjectNotFoundError,
        errors.VersionNotFoundError,
        errors.SchemaNotFoundError,
        errors.IncompatibleSchemaError,
    )
} | {409: errors.IncompatibleSchemaError}  # what Confluent answered before it had 40901


@dataclass(frozen=True)
class SchemaReference:
    name: str
    subject: str
    version: int


@dataclass(frozen=True)
class RegisteredSchema:
    """A schema as the registry knows it."""

    schema_id: int
    text: str
    schema_type: str = "AVRO"
    references: tuple[SchemaReference, ...] = ()
    # The texts of every reference, transitively, by name (a reference's own before it).
    referenced: Mapping[str, str] = field(default_factory=dict)


class RegistryClient:
    """``RegistryClient("http://127.0.0.1:8334", token=...)``; close it (or use ``async with``)."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 10.0) -> None:
        headers = {"Accept": _CONTENT_TYPE, "Content-Type": _CONTENT_TYPE}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._by_id: dict[int, RegisteredSchema] = {}
        self._ids: dict[tuple[str, str, str, tuple[SchemaReference, ...]], int] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def register(
        self,
        subject: str,
        text: str,
        schema_type: str = "AVRO",
        references: Sequence[SchemaReference] = (),
        *,
        auto_register: bool = True,
    ) -> int:
        """The id of ``text`` under ``subject``: registered if new (refused with
        `IncompatibleSchemaError` when the subject's compatibility forbids it), or only looked
        up when ``auto_register`` is false (`SchemaNotFoundError` when it is not there)."""
        key = (subject, schema_type, text, tuple(references))
        known = self._ids.get(key)
        if known is not None:
            return known
        body: dict[str, Any] = {"schema": text}
        if schema_type != "AVRO":
            body["schemaType"] = schema_type
        if references:
            body["references"] = [
                {"name": r.name, "subject": r.subject, "version": r.version} for r in references
            ]
        path = f"/subjects/{quote(subject, safe='')}"
        answer = await self._call("POST", f"{path}/versions" if auto_register else path, body)
        schema_id = int(answer["id"])
        self._ids[key] = schema_id
        return schema_id

    async def schema(self, schema_id: int) -> RegisteredSchema:
        """The schema with this id, with the texts of everything it references."""
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        answer = await self._call("GET", f"/schemas/ids/{schema_id}")
        references = tuple(
            SchemaReference(r["name"], r["subject"], int(r["version"]))
            for r in answer.get("references") or ()
        )
        referenced: dict[str, str] = {}
        for reference in references:
            await self._collect(reference, referenced)
        found = RegisteredSchema(
            schema_id, answer["schema"], answer.get("schemaType") or "AVRO", references, referenced
        )
        self._by_id[schema_id] = found
        return found

    async def _collect(self, reference: SchemaReference, into: dict[str, str]) -> None:
        if reference.name in into:
            return
        path = f"/subjects/{quote(reference.subject, safe='')}/versions/{reference.version}"
        answer = await self._call("GET", path)
        for nested in answer.get("references") or ():
            await self._collect(
                SchemaReference(nested["name"], nested["subject"], int(nested["version"])), into
            )
        into[reference.name] = answer["schema"]

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise errors.RegistryUnavailableError(
                f"schema registry at {self._http.base_url} cannot be reached: {error}"
            ) from None
        if response.is_success:
            return response.json()
        try:
            problem = response.json()
            code, message = int(problem["error_code"]), str(problem["message"])
        except (ValueError, KeyError, TypeError):
            code, message = response.status_code, response.text[:200]
        raise _ERRORS.get(code, errors.RegistryError)(f"schema registry: {message} (error {code})")
