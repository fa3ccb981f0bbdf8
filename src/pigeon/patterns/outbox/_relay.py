"""`OutboxRelay`: publishes the pending rows in order and marks them sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import false, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ...errors import InvalidConfigError
from ...message import Headers
from ...transport.base import Transport
from ._outbox import Outbox
from ._table import utcnow

log = logging.getLogger("pigeon.outbox")

_MARK_CHUNK = 500  # seqs per UPDATE ... IN (...), well under every driver's parameter limit


class OutboxRelay:
    """Publishes an outbox's pending rows, in ``seq`` order, and marks them sent."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        batch_size: int = 100,
        poll_interval_s: float = 0.2,
        max_backoff_s: float = 30.0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
        for name, value in (("poll_interval_s", poll_interval_s), ("max_backoff_s", max_backoff_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        self.outbox = outbox
        self.transport = transport
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self._sqlite = outbox.engine.dialect.name == "sqlite"
        self._engine = outbox.engine
        if not self._sqlite:
            # Read committed: a claim sees rows other relays marked meanwhile, and on InnoDB
            # it takes no gap locks that would hold up the application's inserts during a batch.
            self._engine = outbox.engine.execution_options(isolation_level="READ COMMITTED")

    async def run_once(self) -> int:
        """Publish up to ``batch_size`` pending rows and mark them sent; how many.

        At the first publish that fails the batch stops: the rows published before it are
        marked sent, and the transport's exception is raised (naming the row) with that row
        and the rest still pending.
        """
        table = self.outbox.table
        sent: list[int] = []
        failure: Exception | None = None
        async with self._engine.begin() as conn:
            for row in await self._claim(conn):
                headers = json.loads(row.headers) if row.headers else {}
                msg_id: str | None = row.msg_id
                if not self.transport.capabilities.dedup:
                    # The engine cannot take the id (it could not drop a repeat): carry it as
                    # the original id, which idempotent consumers key on.
                    headers[Headers.ORIGINAL_MSG_ID], msg_id = row.msg_id, None
                try:
                    await self.transport.publish(
                        row.subject, row.payload, key=row.key, headers=headers or None, msg_id=msg_id
                    )
                except Exception as exc:
                    exc.add_note(f"publishing outbox row seq={row.seq} msg_id={row.msg_id} of {table.name}")
                    failure = exc
                    break
                sent.append(row.seq)
            now = utcnow()
            for start in range(0, len(sent), _MARK_CHUNK):
                chunk = sent[start : start + _MARK_CHUNK]
                await conn.execute(update(table).where(table.c.seq.in_(chunk)).values(sent_at=now))
        if failure is not None:
            raise failure
        return len(sent)

    async def _claim(self, conn: AsyncConnection) -> Sequence[Any]:
        table = self.outbox.table
        c = table.c
        query = (
            select(c.seq, c.msg_id, c.subject, c.key, c.headers, c.payload)
            .where(c.sent_at.is_(None))
            .order_by(c.seq)
            .limit(self.batch_size)
        )
        if self._sqlite:
            # A write statement, even one that changes nothing, takes the file's write lock
            # now (as BEGIN IMMEDIATE would), whatever transaction mode the driver is in:
            # nobody else can mark these rows before this transaction ends.
            await conn.execute(update(table).where(false()).values(sent_at=None))
        else:
            query = query.with_for_update(skip_locked=True)
        return (await conn.execute(query)).all()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until ``stop`` is set (or the task is cancelled).

        Runs passes back to back while they find rows, polls every ``poll_interval_s`` when
        idle, and after a failure logs it and waits twice as long each time (from twice
        ``poll_interval_s`` up to ``max_backoff_s``) before retrying the same row.
        """
        stop = stop if stop is not None else asyncio.Event()
        failures = 0
        while not stop.is_set():
            try:
                count = await self.run_once()
            except Exception:
                failures += 1
                delay = min(self.poll_interval_s * 2 ** min(failures, 30), self.max_backoff_s)
                log.warning(
                    "outbox relay for %s: failure %d in a row, retrying in %.2f s",
                    self.outbox.table.name,
                    failures,
                    delay,
                    exc_info=True,
                )
                await _wait(stop, delay)
                continue
            failures = 0
            if count == 0:
                await _wait(stop, self.poll_interval_s)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
