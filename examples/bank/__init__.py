"""A bank account domain, event sourced on pigeon (docs/event-sourcing.md).

Run it from the repository root::

    python -m examples.bank demo --data /tmp/bank            # commands, queries, time travel
    python -m examples.bank project --data /tmp/bank --db sqlite+aiosqlite:///bank.db

The command side (`examples.bank.service.Bank`) changes accounts only through the `Account`
aggregate (`examples.bank.domain`): each command loads the account (latest snapshot plus the
events after it), checks the rules, and appends its events with optimistic concurrency. The
query side reads the `accounts` table that `AccountsProjection` (`examples.bank.readmodel`)
keeps from the event stream; a query after a command waits for the projection to reach the
command's position (read-your-writes). ``MoneyDeposited`` is at schema version 2: version 1
events (no ``reference``) are upcast when read.
"""
