"""``python -m examples.bank demo|fill|project``: see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import create_async_engine

from pigeon.engine import Engine
from pigeon.es import EventStore, FolderSnapshotStore, Repository
from pigeon.es.projection import ProjectionRunner

from .domain import Account, BankError, registry
from .readmodel import AccountsProjection
from .service import Bank


async def demo(data: Path, db_url: str) -> None:
    db = create_async_engine(db_url)
    async with await Engine.open(data) as engine:
        bank = await Bank.open(engine, db, snapshots=FolderSnapshotStore(data / "snapshots"))
        try:
            await bank.open_account("alice", "Alice", overdraft_limit=50_00)
            await bank.deposit("alice", 120_00, "salary")
            before_rent = time.time()
            done = await bank.withdraw("alice", 80_00, "rent")
            # Read-your-writes: the query waits until the projection has applied the withdrawal.
            after_rent = await bank.account("alice", after=done)
            print(json.dumps({"query": "alice after rent", "account": after_rent}))
            try:
                await bank.withdraw("alice", 100_00, "a holiday")
            except BankError as refused:
                print(json.dumps({"refused": str(refused)}))
            then = await bank.balance_at("alice", before_rent)
            print(json.dumps({"query": "alice before rent", "balance": then}))
            # Events written by an older release: MoneyDeposited at schema version 1 had no
            # reference. They are upcast when read; the log keeps them as they were written.
            old = [
                ("AccountOpened", 1, b'{"owner":"Bob","overdraft_limit":0}'),
                ("MoneyDeposited", 1, b'{"amount":500}'),
            ]
            await bank.accounts.store.append_stored("Account", "bob", old, expected_version=0)
            done = await bank.deposit("bob", 250, "change")
            print(
                json.dumps(
                    {
                        "query": "bob, opened by the old release",
                        "account": await bank.account("bob", after=done),
                    }
                )
            )
        finally:
            await bank.close()
    await db.dispose()


async def fill(data: Path, accounts: int, commands: int, seed: int, stream: str) -> None:
    """Random history: ``commands`` deposits and withdrawals over ``accounts`` accounts."""
    rng = random.Random(seed)
    async with await Engine.open(data) as engine:
        store = await EventStore.open(engine, stream, registry=registry(), durability="never")
        repository = Repository(store, Account)
        loaded = {}
        for n in range(accounts):
            account = Account.open(f"acc-{n}", f"owner {n}", overdraft_limit=1000)
            await repository.save(account)
            loaded[account.id] = account
        for _ in range(commands):
            account = loaded[f"acc-{rng.randrange(accounts)}"]
            amount = rng.randrange(1, 500)
            if rng.random() < 0.6 or account.balance - amount < -account.overdraft_limit:
                account.deposit(amount)
            else:
                account.withdraw(amount)
            await repository.save(account)
    print(json.dumps({"accounts": accounts, "commands": commands}))


async def project(data: Path, db_url: str, stream: str, batch: int) -> None:
    """Run the projection until it has applied everything stored, then stop."""
    db = create_async_engine(db_url)
    async with await Engine.open(data) as engine:
        store = await EventStore.open(engine, stream, registry=registry())
        runner = ProjectionRunner(store, AccountsProjection(), db, batch=batch)
        await runner.start()
        try:
            await runner.catch_up()
        finally:
            await runner.stop()
    await db.dispose()
    print(json.dumps({"caught_up": runner.positions}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.bank")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "fill", "project"):
        command = commands.add_parser(name)
        command.add_argument("--data", type=Path, help="the engine's data folder")
        command.add_argument("--stream", default="bank")
        if name != "fill":
            command.add_argument("--db", help="read model database URL (default: SQLite in --data)")
    commands.choices["fill"].add_argument("--accounts", type=int, default=10)
    commands.choices["fill"].add_argument("--commands", type=int, default=1000)
    commands.choices["fill"].add_argument("--seed", type=int, default=1)
    commands.choices["project"].add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    data: Path = args.data or Path(tempfile.mkdtemp(prefix="bank-"))
    db_url = getattr(args, "db", None) or f"sqlite+aiosqlite:///{data / 'readmodel.db'}"
    if args.command == "demo":
        asyncio.run(demo(data, db_url))
    elif args.command == "fill":
        asyncio.run(fill(data, args.accounts, args.commands, args.seed, args.stream))
    else:
        asyncio.run(project(data, db_url, args.stream, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
