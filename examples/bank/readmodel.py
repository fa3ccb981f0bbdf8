"""The query side: an ``accounts`` table kept by a projection of the account events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pigeon.es import RecordedEvent, handles
from pigeon.es.projection import Projection

from .domain import AccountClosed, AccountOpened, MoneyDeposited, MoneyWithdrawn


class AccountsProjection(Projection):
    """One row per account. ``transactions`` counts deposits and withdrawals: applying an event
    twice would show there (and in the balance), which is what the crash test checks."""

    def __init__(self, name: str = "accounts", table: str = "bank_accounts") -> None:
        self.name = name
        self.metadata = MetaData()
        self.table = Table(
            table,
            self.metadata,
            Column("account_id", String(128), primary_key=True),
            Column("owner", String(200), nullable=False),
            Column("balance", Integer, nullable=False),
            Column("transactions", Integer, nullable=False),
            Column("version", Integer, nullable=False),
            Column("closed", Boolean, nullable=False),
        )

    @handles(AccountOpened)
    async def _opened(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        await conn.execute(
            self.table.insert().values(
                account_id=recorded.aggregate_id,
                owner=recorded.event.owner,
                balance=0,
                transactions=0,
                version=recorded.version,
                closed=False,
            )
        )

    @handles(MoneyDeposited, MoneyWithdrawn)
    async def _moved(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        sign = 1 if isinstance(recorded.event, MoneyDeposited) else -1
        row = self.table.c
        await conn.execute(
            update(self.table)
            .where(row.account_id == recorded.aggregate_id)
            .values(
                balance=row.balance + sign * recorded.event.amount,
                transactions=row.transactions + 1,
                version=recorded.version,
            )
        )

    @handles(AccountClosed)
    async def _closed(self, conn: AsyncConnection, recorded: RecordedEvent) -> None:
        await conn.execute(
            update(self.table)
            .where(self.table.c.account_id == recorded.aggregate_id)
            .values(closed=True, version=recorded.version)
        )

    async def rows(self, db: AsyncEngine) -> dict[str, dict[str, Any]]:
        """The whole read model, by account id."""
        async with db.connect() as conn:
            result = await conn.execute(select(self.table).order_by(self.table.c.account_id))
            return {row.account_id: dict(row._mapping) for row in result}
