"""The transactional outbox: messages saved with the application's data, published by a relay.

The application calls `Outbox.add` inside its own database transaction, so a message exists
exactly when the data change that caused it was committed. An `OutboxRelay` then publishes
the pending rows to a `Transport` in ``seq`` order and marks them sent. A crash anywhere
(after the application's commit, in the middle of a batch, before the rows are marked) loses
nothing: rows stay pending until a publish returned and the mark was committed.

Delivery from the outbox is **at least once**. A crash after a publish but before its row
was marked sent publishes that row again on the next pass, with the same message id: the
broker drops it where the transport has ``capabilities.dedup`` (within the stream's dedup
window), and elsewhere idempotent consumers, which key on the message id, skip it.

Order. Rows are published in ``seq`` order, and a relay never skips ahead of a row whose
publish failed: the batch stops there and the row is retried on a later pass (after a
backoff, in `OutboxRelay.run`). A row the transport refuses for good (say, too large for it)
therefore holds up the outbox until someone fixes or deletes it; the warning logged names it.
``seq`` is allocated at insert time, so on PostgreSQL and MariaDB two application
transactions that overlap can commit in the other order than their ``seq``; rows of one key
stay in order when the application's transactions for that key do not overlap (they
usually lock the same aggregate row).

Several relays. On PostgreSQL and MySQL/MariaDB (10.6+) each relay claims a batch with
``SELECT ... FOR UPDATE SKIP LOCKED``, so relays split the rows and none is published twice
in the normal case; strict global order, and per-key order, need a single relay (several keep
order only within each one's batches). SQLite has no row locks: a relay takes the file's
write lock for the whole batch, so a second relay would only wait for the first. Run one
relay per SQLite file. While a batch is being published, the application's writes to that
SQLite file wait for it (up to the driver's busy timeout).

The session given to `Outbox.add` must be connected to the database of the outbox's engine.
Timestamps are UTC, without a zone. Needs the ``pigeon[sql]`` extra (SQLAlchemy 2 asyncio).
"""

from ._outbox import Outbox
from ._relay import OutboxRelay

__all__ = ["Outbox", "OutboxRelay"]
