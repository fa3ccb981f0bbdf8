"""Command side and query side of the bank, kept apart.

Commands go through the `Account` aggregate and the event store; queries read the projection's
table only. A query given the result of a command first waits until the projection has
applied that command's events, so a client always reads its own writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from pigeon.engine import Engine
from pigeon.es import AggregateConflictError, AppendResult, EventStore, Repository, SnapshotStore
from pigeon.es.projection import ProjectionRunner

from .domain import Account, registry
from .readmodel import AccountsProjection

_RETRIES = 3  # a conflicting writer means: load the account again and decide again


class Bank:
    def __init__(self, repository: Repository[Account], runner: ProjectionRunner, db: AsyncEngine) -> None:
        self.accounts = repository
        self.runner = runner
        self.db = db
        self.projection = runner.projection
        assert isinstance(self.projection, AccountsProjection)

    @classmethod
    async def open(
        cls,
        engine: Engine,
        db: AsyncEngine,
        *,
        stream: str = "bank",
        snapshots: SnapshotStore | None = None,
        projection: AccountsProjection | None = None,
    ) -> Bank:
        store = await EventStore.open(engine, stream, registry=registry())
        runner = ProjectionRunner(store, projection or AccountsProjection(), db)
        await runner.start()
        return cls(Repository(store, Account, snapshots=snapshots), runner, db)

    async def close(self) -> None:
        await self.runner.stop()

    # -- commands -----------------------------------------------------------------------------------

    async def open_account(self, id: str, owner: str, overdraft_limit: int = 0) -> AppendResult:
        result = await self.accounts.save(Account.open(id, owner, overdraft_limit))
        assert result is not None
        return result

    async def deposit(self, id: str, amount: int, reference: str = "") -> AppendResult:
        return await self._change(id, lambda account: account.deposit(amount, reference))

    async def withdraw(self, id: str, amount: int, reference: str = "") -> AppendResult:
        return await self._change(id, lambda account: account.withdraw(amount, reference))

    async def close_account(self, id: str, reason: str) -> AppendResult:
        return await self._change(id, lambda account: account.close(reason))

    async def _change(self, id: str, command: Callable[[Account], None]) -> AppendResult:
        attempt = 1
        while True:
            account = await self.accounts.load(id)
            command(account)
            try:
                result = await self.accounts.save(account)
            except AggregateConflictError:
                if attempt == _RETRIES:
                    raise
                attempt += 1
                continue
            assert result is not None
            return result

    # -- queries ------------------------------------------------------------------------------------

    async def account(self, id: str, *, after: AppendResult | None = None) -> dict[str, Any] | None:
        """The account as the read model has it; after a command, including that command."""
        if after is not None:
            await self.runner.wait_for(after)
        return (await self.projection.rows(self.db)).get(id)

    async def balance_at(self, id: str, at_time: float) -> int:
        """What the balance was at a moment: from the events, not the read model."""
        return (await self.accounts.load(id, at_time=at_time)).balance
