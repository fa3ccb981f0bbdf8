"""The domain: account events and the `Account` aggregate, which enforces the rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pigeon.es import Aggregate, EventRegistry, domain_event, handles


class BankError(Exception):
    """A command broke a rule of the bank (the caller's mistake, not a fault)."""


@domain_event("AccountOpened")
@dataclass(frozen=True)
class AccountOpened:
    owner: str
    overdraft_limit: int  # cents


@domain_event("MoneyDeposited", version=2)
@dataclass(frozen=True)
class MoneyDeposited:
    amount: int  # cents
    reference: str  # added in version 2


@domain_event("MoneyWithdrawn")
@dataclass(frozen=True)
class MoneyWithdrawn:
    amount: int
    reference: str


@domain_event("AccountClosed")
@dataclass(frozen=True)
class AccountClosed:
    reason: str


def registry() -> EventRegistry:
    """Every event class, with the upcasters of their older versions."""
    events = EventRegistry([AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed])

    @events.upcaster("MoneyDeposited", from_version=1)
    def _reference(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "reference": ""}

    return events


class Account(Aggregate):
    snapshot_every = 100

    owner = ""
    balance = 0
    overdraft_limit = 0
    closed = False

    @classmethod
    def open(cls, id: str, owner: str, overdraft_limit: int = 0) -> Account:
        if not owner.strip():
            raise BankError("an account needs an owner")
        if overdraft_limit < 0:
            raise BankError("the overdraft limit cannot be negative")
        account = cls(id)
        account.trigger(AccountOpened(owner, overdraft_limit))
        return account

    def deposit(self, amount: int, reference: str = "") -> None:
        self._check_open()
        if amount <= 0:
            raise BankError(f"deposit a positive amount, not {amount}")
        self.trigger(MoneyDeposited(amount, reference))

    def withdraw(self, amount: int, reference: str = "") -> None:
        self._check_open()
        if amount <= 0:
            raise BankError(f"withdraw a positive amount, not {amount}")
        if self.balance - amount < -self.overdraft_limit:
            raise BankError(f"account {self.id} cannot go below -{self.overdraft_limit}")
        self.trigger(MoneyWithdrawn(amount, reference))

    def close(self, reason: str) -> None:
        self._check_open()
        if self.balance != 0:
            raise BankError(f"account {self.id} still holds {self.balance}: empty it first")
        self.trigger(AccountClosed(reason))

    def _check_open(self) -> None:
        if self.closed:
            raise BankError(f"account {self.id} is closed")

    @handles(AccountOpened)
    def _opened(self, event: AccountOpened) -> None:
        self.owner = event.owner
        self.overdraft_limit = event.overdraft_limit

    @handles(MoneyDeposited)
    def _deposited(self, event: MoneyDeposited) -> None:
        self.balance += event.amount

    @handles(MoneyWithdrawn)
    def _withdrawn(self, event: MoneyWithdrawn) -> None:
        self.balance -= event.amount

    @handles(AccountClosed)
    def _closed(self, event: AccountClosed) -> None:
        self.closed = True
