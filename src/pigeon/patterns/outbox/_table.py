"""The outbox table: its columns, and the column types that keep it portable."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite")
# Short enough for the index names derived from it (PostgreSQL truncates names at 63 bytes).
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")
MAX_ID_BYTES = 255  # the longest message id every transport accepts

_MYSQL = ("mysql", "mariadb")
_TIMESTAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)
# Message ids are case- and accent-sensitive: MySQL's default collations are neither.
_MSG_ID = String(MAX_ID_BYTES).with_variant(
    mysql.VARCHAR(MAX_ID_BYTES, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
)


class _MySQLPayload(TypeDecorator[bytes]):
    """A LONGBLOB (MySQL's plain BLOB stops at 64 KiB) written as hex text through UNHEX().

    aiomysql 0.3 with PyMySQL 1.2 fails on every bytes parameter (aio-libs/aiomysql#1080);
    text parameters work with every MySQL driver.
    """

    impl = mysql.LONGBLOB
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return func.unhex(bindvalue, type_=self)

    def bind_processor(self, dialect: Dialect) -> Callable[[bytes | None], str | None]:
        # Replaces the BLOB's own processor, which would turn the hex text back into bytes.
        return lambda value: None if value is None else value.hex()


_PAYLOAD = LargeBinary().with_variant(_MySQLPayload(), *_MYSQL)
# SQLite only auto-assigns an INTEGER PRIMARY KEY (its rowid), not a BIGINT one.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")


def outbox_table(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        Column("seq", _SEQ, primary_key=True, autoincrement=True),
        Column("msg_id", _MSG_ID, nullable=False),
        Column("subject", Text, nullable=False),
        Column("key", Text),
        Column("headers", Text),  # a JSON object; NULL when there are none
        Column("payload", _PAYLOAD, nullable=False),
        Column("created_at", _TIMESTAMP, nullable=False),
        Column("sent_at", _TIMESTAMP),
        UniqueConstraint("msg_id", name=f"uq_{name}_msg_id"),
        # Serves both the relay (sent_at IS NULL, by seq) and purge_sent (a sent_at range).
        Index(f"ix_{name}_sent_seq", "sent_at", "seq"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
