"""An idempotency store in a SQL table, transactional with the handler's own writes.

The claim is a row ``(scope, message_id, processed_at)`` inserted in a transaction that stays
open while the handler runs; the handler writes in the same ``AsyncSession``
(``claim.session``), so its effects and the claim commit together, or roll back together.
A message is therefore processed exactly once per scope as far as the database sees it: a
crash before the commit leaves no trace, and a redelivery after it is a duplicate. Do not
commit ``claim.session`` yourself; the store commits it when the ``async with`` block ends.

The insert ignores a conflicting row (PostgreSQL and SQLite: ``INSERT ... ON CONFLICT DO
NOTHING``; MySQL and MariaDB: ``INSERT IGNORE``) and the affected row count tells a new claim
(1) from a duplicate (0). Two consumers claiming the same key at once: the second insert
waits on the first one's uncommitted row and becomes a duplicate when it commits, or a new
claim when it rolls back. Waits are bounded by the database: ``lock_timeout`` (PostgreSQL),
``innodb_lock_wait_timeout`` (MySQL/MariaDB, 50 s by default), the busy timeout (SQLite).
Such an error, a deadlock MySQL reports when several waiters race, or a serialization
failure under a stricter isolation level than the default, propagates like any handler
error: the message is redelivered and the next attempt sees the outcome.

SQLite allows one writer at a time per database file, so claims are serialized: a claim
holds the write lock until its handler finishes, and other claims wait up to the busy
timeout (5 s by default; raise it with ``connect_args={"timeout": seconds}``) before failing
with "database is locked". It suits one process; use PostgreSQL or MariaDB to share the work.

``processed_at`` is the claim's time in UTC, stored without a time zone.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table, delete, inspect
from sqlalchemy import insert as generic_insert
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeEngine

from ...errors import InvalidConfigError, InvalidNameError
from .base import MAX_KEY_LENGTH, Claim, IdempotencyStore, validate_claim, validate_seconds

DEFAULT_TABLE = "pigeon_processed_messages"
SUPPORTED_DIALECTS = ("postgresql", "sqlite", "mysql", "mariadb")
_MYSQL_FAMILY = ("mysql", "mariadb")
# Short enough that "<table>_processed_at" fits every supported database's identifier limit.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}\Z")


class SqlIdempotencyStore(IdempotencyStore):
    """Idempotency marks in the table ``table`` of the database ``engine`` connects to.

    Call `create_table` once (it does nothing when the table exists). `close` disposes the
    engine only when `from_url` created it.
    """

    def __init__(self, engine: AsyncEngine, *, table: str = DEFAULT_TABLE) -> None:
        self.dialect = engine.dialect.name
        if self.dialect not in SUPPORTED_DIALECTS:
            raise InvalidConfigError(
                f"SqlIdempotencyStore does not support the {self.dialect!r} dialect; "
                f"use one of: {', '.join(SUPPORTED_DIALECTS)}"
            )
        if not isinstance(table, str) or not _TABLE_NAME.match(table):
            raise InvalidNameError(
                f"invalid table name {table!r}: use 1 to 50 letters, digits or '_', not starting with a digit"
            )
        self.engine = engine
        self.table = _define_table(table, String(MAX_KEY_LENGTH))
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._owns_engine = False

    @classmethod
    def from_url(cls, url: str, *, table: str = DEFAULT_TABLE, **engine_options: Any) -> SqlIdempotencyStore:
        """A store on a new engine: ``sqlite+aiosqlite:///path.db``,
        ``postgresql+asyncpg://...``, ``mysql+aiomysql://...``; options go to
        ``create_async_engine``."""
        store = cls(create_async_engine(url, **engine_options), table=table)
        store._owns_engine = True
        return store

    async def create_table(self) -> None:
        """Create the table and its index on ``processed_at`` unless they exist."""
        try:
            async with self.engine.begin() as connection:
                await connection.run_sync(self._create)
        except DBAPIError:
            # Replicas starting together race between the existence check and the CREATE;
            # losing that race is fine.
            async with self.engine.connect() as connection:
                if not await connection.run_sync(lambda sync: inspect(sync).has_table(self.table.name)):
                    raise

    def _create(self, connection: Connection) -> None:
        table = self.table
        if self.dialect in _MYSQL_FAMILY:
            table = _define_table(table.name, _exact_text(connection.dialect))
        table.create(connection, checkfirst=True)

    @asynccontextmanager
    async def claim(self, key: str, *, scope: str) -> AsyncIterator[Claim]:
        validate_claim(key, scope)
        # On an exception from the body, closing the session rolls the claim back.
        async with self._sessions() as session:
            await session.begin()
            if not await self._insert(session, scope, key):
                # End the empty transaction now rather than hold a connection (and, on
                # InnoDB, a lock on the existing row) while the caller skips the message.
                await session.rollback()
                yield Claim(duplicate=True)
                return
            yield Claim(duplicate=False, session=session)
            await session.commit()

    async def _insert(self, session: AsyncSession, scope: str, key: str) -> bool:
        values = {"scope": scope, "message_id": key, "processed_at": _utc_now()}
        statement: Insert
        if self.dialect in _MYSQL_FAMILY:
            # Safe only because keys are validated to fit: IGNORE would also truncate silently.
            statement = generic_insert(self.table).values(values).prefix_with("IGNORE")
        elif self.dialect == "postgresql":
            statement = postgresql.insert(self.table).values(values).on_conflict_do_nothing()
        else:
            statement = sqlite.insert(self.table).values(values).on_conflict_do_nothing()
        connection = await session.connection()
        result = await connection.execute(statement)
        return result.rowcount == 1

    async def forget_older_than(self, seconds: float) -> int:
        """Delete the marks claimed more than ``seconds`` ago, in one statement.

        Keep marks for longer than a message can still be redelivered (the stream's
        retention, or the longest retry delay), or a late copy is processed again.
        """
        cutoff = _utc_now() - timedelta(seconds=validate_seconds(seconds, "forget_older_than seconds"))
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(self.table).where(self.table.c.processed_at < cutoff))
        return result.rowcount

    async def close(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()


def _define_table(name: str, text: TypeEngine[str]) -> Table:
    return Table(
        name,
        MetaData(),
        Column("scope", text, primary_key=True),
        Column("message_id", text, primary_key=True),
        Column("processed_at", DateTime(), nullable=False),
        Index(f"{name}_processed_at", "processed_at"),
    )


def _exact_text(dialect: Dialect) -> TypeEngine[str]:
    """A MySQL/MariaDB text type compared byte for byte.

    The default collations ignore case and trailing spaces, which would make distinct
    message ids duplicates of each other. MySQL needs 8.0.17 or later for ``utf8mb4_0900_bin``.
    """
    collation = "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
    return mysql.VARCHAR(MAX_KEY_LENGTH, charset="utf8mb4", collation=collation)


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
