"""`Outbox`: the table, and adding messages to it in the application's transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from ...errors import InvalidConfigError, InvalidMessageError, InvalidNameError
from ...message import new_id
from ...subjects import validate_subject
from ._table import DIALECTS, MAX_ID_BYTES, TABLE_NAME, outbox_table, utcnow


def _check_text(what: str, value: object, max_bytes: int | None = None) -> str:
    # The strictest rules among the databases and transports: a row the relay cannot publish
    # would hold up the whole outbox, so refuse it here, in the application's transaction.
    if not isinstance(value, str):
        raise InvalidMessageError(f"{what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidMessageError(f"{what} {value!r} must not contain NUL characters")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidMessageError(f"{what} {value!r} is not valid Unicode text") from None
    if max_bytes is not None and not 1 <= size <= max_bytes:
        raise InvalidMessageError(f"{what} {value!r} must be 1 to {max_bytes} bytes")
    return value


def _encode_headers(headers: object) -> str | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(f"headers must be a mapping of text to text, not {type(headers).__name__}")
    for name, value in headers.items():
        _check_text("header name", name, 65535)
        _check_text(f"header {name!r}", value)
    return json.dumps(dict(headers), separators=(",", ":")) if headers else None


class Outbox:
    """The outbox table in the application's database (PostgreSQL, MySQL/MariaDB or SQLite)."""

    def __init__(self, engine: AsyncEngine, *, table: str = "pigeon_outbox") -> None:
        if not isinstance(table, str) or not TABLE_NAME.fullmatch(table):
            raise InvalidNameError(
                f"outbox table name {table!r}: use 1 to 50 letters, digits and '_', not starting with a digit"
            )
        if engine.dialect.name not in DIALECTS:
            raise InvalidConfigError(
                f"the outbox runs on PostgreSQL, MySQL/MariaDB or SQLite, not {engine.dialect.name}"
            )
        self.engine = engine
        self.table = outbox_table(table)
        self._owns_engine = False

    @classmethod
    def from_url(cls, url: str, *, table: str = "pigeon_outbox", **engine_options: Any) -> Outbox:
        """An outbox on its own engine (``create_async_engine(url, **engine_options)``),
        disposed by `close`."""
        outbox = cls(create_async_engine(url, **engine_options), table=table)
        outbox._owns_engine = True
        return outbox

    async def create_table(self) -> None:
        """Create the table and its indexes unless they exist."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.table.metadata.create_all, checkfirst=True)

    async def drop_table(self) -> None:
        """Drop the table, pending rows included."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.table.metadata.drop_all, checkfirst=True)

    async def add(
        self,
        session: AsyncSession | AsyncConnection,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> str:
        """Insert one message in the caller's transaction (not committed here); its id.

        A ``msg_id`` already in the table violates its unique constraint: the database's
        ``IntegrityError`` then comes from here, and the caller's transaction is spoilt.
        """
        validate_subject(subject)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
        if key is not None:
            _check_text("key", key, 65535)
        message_id = new_id() if msg_id is None else _check_text("message id", msg_id, MAX_ID_BYTES)
        await session.execute(
            insert(self.table).values(
                msg_id=message_id,
                subject=subject,
                key=key,
                headers=_encode_headers(headers),
                payload=bytes(payload),
                created_at=utcnow(),
            )
        )
        return message_id

    async def pending(self) -> int:
        """How many rows are not sent yet."""
        query = select(func.count()).select_from(self.table).where(self.table.c.sent_at.is_(None))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def purge_sent(self, older_than_s: float) -> int:
        """Delete the rows sent more than ``older_than_s`` seconds ago; how many."""
        if isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float) or older_than_s < 0:
            raise InvalidConfigError(f"older_than_s must be a number of seconds >= 0, not {older_than_s!r}")
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        async with self.engine.begin() as conn:
            result = await conn.execute(self.table.delete().where(self.table.c.sent_at < cutoff))
            return int(result.rowcount)

    async def close(self) -> None:
        """Dispose of the engine if `from_url` made it; an engine passed in stays the caller's."""
        if self._owns_engine:
            await self.engine.dispose()
