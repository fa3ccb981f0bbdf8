"""The LISTEN connection and core messaging: wake-ups, registry changes, subscriptions, requests.

One dedicated connection per transport LISTENs on three channels of the schema:

- ``<schema>:data`` (payload: a stream name): something changed in that stream or its groups
  (new messages, a nack, a member joining or leaving). Waiting consumers look again.
- ``<schema>:ctl``: the stream registry changed, or a core subscription came or went.
- ``<schema>:core``: core messages (frames, `._codec`), filtered here by subject.

Publishers only NOTIFY a core message when some subscription, in any process, matches its
subject: subscriptions are registered in the ``core_interest`` table and announced on the
control channel, and every transport keeps the set in memory (`Interest`). Queue groups are
emulated there too: the publisher picks one member of each matching queue group (in turn)
and names it in the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ...errors import InvalidConfigError, RequestTimeoutError, TransportClosedError
from ...message import Message
from ...subjects import SubjectIndex, matches, validate_pattern
from ..base import Subscription
from ._codec import Frame, frame_message, parse_frame
from ._options import Names, PostgresOptions

log = logging.getLogger("pigeon.transport.postgres")

INBOX_PREFIX = "_INBOX."


class Signal:
    """A wake-up counter: read ``version`` before looking, then wait for it to move on."""

    __slots__ = ("_event", "version")

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> None:
        """Return when the version differs from ``seen``, or after ``timeout`` seconds."""
        if self.version != seen or timeout <= 0:
            return
        event = self._event
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: a cancelled fetch must stop (see engine groups).
            async with asyncio.timeout(timeout):
                await event.wait()


class Interest:
    """Every live core subscription (all processes): pattern and queue group, by id."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str | None]] = {}
        self._index: SubjectIndex[str] = SubjectIndex()
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}

    def add(self, sid: str, pattern: str, queue: str | None) -> None:
        if sid not in self.entries:
            self.entries[sid] = (pattern, queue)
            self._index.add(pattern, sid)

    def remove(self, sid: str) -> None:
        entry = self.entries.pop(sid, None)
        if entry is not None:
            self._index.remove(entry[0], sid)

    def replace(self, rows: list[tuple[str, str, str | None]]) -> None:
        wanted = {sid: (pattern, queue) for sid, pattern, queue in rows}
        for sid in [s for s in self.entries if s not in wanted]:
            self.remove(sid)
        for sid, (pattern, queue) in wanted.items():
            self.add(sid, pattern, queue)

    def route(self, subject: str) -> tuple[bool, list[str]]:
        """(whether anyone listens, the queue members picked: one per matching queue group)."""
        if not self.entries:
            return False, []
        plain = False
        groups: dict[tuple[str, str], list[str]] = {}
        for sid in self._index.match(subject):
            pattern, queue = self.entries[sid]
            if queue is None:
                plain = True
            else:
                groups.setdefault((pattern, queue), []).append(sid)
        picked = []
        for group, members in groups.items():
            members.sort()
            turn = next(self._turns.setdefault(group, itertools.count()))
            picked.append(members[turn % len(members)])
        return plain or bool(picked), picked


class PgSubscription(Subscription):
    def __init__(self, core: Core, sid: str, pattern: str, queue: str | None, buffer_size: int) -> None:
        self.core = core
        self.id = sid
        self.pattern = pattern
        self.queue = queue
        self.dropped = 0
        self.closed = False
        self._buffer_size = buffer_size
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()

    def _offer(self, message: Message) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self.dropped += 1
            log.warning(
                "slow subscriber on %r (queue %r): buffer full, dropped the oldest message (%d so far)",
                self.pattern,
                self.queue,
                self.dropped,
            )
        self._buffer.append(message)
        self._arrived.set()

    async def next(self, timeout: float | None = None) -> Message:
        while not self._buffer:
            if self.closed:
                raise TransportClosedError(f"subscription to {self.pattern!r} is closed")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return self._buffer.popleft()

    async def unsubscribe(self) -> None:
        if not self.closed:
            self.closed = True
            self._arrived.set()
            await self.core.remove(self)


class Core:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        names: Names,
        options: PostgresOptions,
        on_streams_changed: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.dsn = dsn
        self.names = names
        self.options = options
        self.interest = Interest()
        self.inbox_prefix = f"{INBOX_PREFIX}{uuid.uuid4().hex}."
        self._on_streams_changed = on_streams_changed
        self._signals: dict[str, Signal] = {}
        self._plain: SubjectIndex[PgSubscription] = SubjectIndex()
        self._local: dict[str, PgSubscription] = {}
        self._replies: dict[str, asyncio.Future[Message]] = {}
        self._requests = itertools.count()
        self._frames: asyncio.Queue[Frame] = asyncio.Queue()
        self._conn: asyncpg.Connection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._loading = False
        self._deltas: list[dict[str, Any]] = []
        self.closed = False

    # -- the LISTEN connection -------------------------------------------------------------------

    async def start(self) -> None:
        await self._connect()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.options.connect_timeout_s)
        try:
            await conn.add_listener(self.names.data_channel, self._on_data)
            await conn.add_listener(self.names.control_channel, self._on_control)
            await conn.add_listener(self.names.core_channel, self._on_core)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._on_lost)
        self._conn = conn
        await self._load_interest()

    @property
    def pid(self) -> int:
        if self._conn is None:
            raise TransportClosedError("the PostgreSQL transport lost its LISTEN connection")
        return int(self._conn.get_server_pid())

    def _on_lost(self, conn: asyncpg.Connection) -> None:
        if self.closed or conn is not self._conn:
            return
        self._conn = None
        log.warning("PostgreSQL LISTEN connection lost; reconnecting")
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self.closed:
            try:
                await self._connect()
                # Re-register this process's subscriptions under the new backend pid.
                async with self.pool.acquire() as conn:
                    for sub in list(self._local.values()):
                        await self._register(conn, sub)
                self._on_streams_changed()
                self.bump_all()  # consumers may have missed wake-ups meanwhile
                log.info("PostgreSQL LISTEN connection re-established")
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reconnecting the LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- notifications -------------------------------------------------------------------------------

    def signal(self, stream: str) -> Signal:
        signal = self._signals.get(stream)
        if signal is None:
            signal = self._signals[stream] = Signal()
        return signal

    def bump(self, stream: str) -> None:
        signal = self._signals.get(stream)
        if signal is not None:
            signal.bump()

    def bump_all(self) -> None:
        for signal in self._signals.values():
            signal.bump()

    def _on_data(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.bump(payload)

    def _on_control(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            delta = json.loads(payload)
        except ValueError:
            return
        if delta.get("t") == "streams":
            self._on_streams_changed()
        elif self._loading:
            self._deltas.append(delta)
        else:
            self._apply(delta)

    def _apply(self, delta: dict[str, Any]) -> None:
        if delta.get("t") == "+":
            self.interest.add(delta["id"], delta["p"], delta.get("q"))
        elif delta.get("t") == "-":
            self.interest.remove(delta["id"])

    async def _load_interest(self) -> None:
        # Deltas arriving while the snapshot is read are applied after it, in order, so a
        # removal announced meanwhile is not undone by an older snapshot.
        self._loading = True
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT subscription, pattern, queue FROM {self.names.interest} "
                    "WHERE pid IN (SELECT pid FROM pg_stat_activity)"
                )
            self.interest.replace([(r["subscription"], r["pattern"], r["queue"]) for r in rows])
            for sub in self._local.values():
                self.interest.add(sub.id, sub.pattern, sub.queue)
        finally:
            self._loading = False
            deltas, self._deltas = self._deltas, []
            for delta in deltas:
                self._apply(delta)

    def _on_core(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        frame = parse_frame(payload)
        if frame is not None and self._wanted(frame):
            self._frames.put_nowait(frame)

    def _wanted(self, frame: Frame) -> bool:
        if frame.subject.startswith(self.inbox_prefix):
            return frame.subject in self._replies
        if any(t in self._local for t in frame.targets):
            return True
        try:
            return bool(self._plain.match(frame.subject))
        except ValueError:  # not a valid subject: not one of ours
            return False

    async def _dispatch(self) -> None:
        # One task, in arrival order: a frame passed by reference must not be overtaken by
        # the frames after it while its body is read.
        while True:
            frame = await self._frames.get()
            try:
                await self._deliver(frame)
            except asyncio.CancelledError:
                raise
            except Exception:  # a malformed frame or an expired blob: core is at most once
                log.exception("could not deliver a core message on %r", frame.subject)

    async def _deliver(self, frame: Frame) -> None:
        head = frame.head
        if frame.blob is not None:
            async with self.pool.acquire() as conn:
                body = await conn.fetchval(
                    f"SELECT body FROM {self.names.blobs} WHERE id = $1", uuid.UUID(frame.blob)
                )
            if body is None:
                log.warning("a core message on %r expired before it was read", frame.subject)
                return
            head = json.loads(body)
        message = frame_message(head)
        future = self._replies.pop(frame.subject, None)
        if future is not None:
            if not future.done():
                future.set_result(message)
            return
        for sub in self._plain.match(frame.subject):
            sub._offer(message)
        for target in frame.targets:
            member = self._local.get(target)
            if member is not None and matches(member.pattern, frame.subject):
                member._offer(message)

    # -- subscriptions ----------------------------------------------------------------------------------

    async def subscribe(self, pattern: str, queue: str | None) -> PgSubscription:
        self.check_open()
        validate_pattern(pattern)
        if queue is not None and (not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)):
            raise InvalidConfigError(f"queue group name must be non-empty text without spaces, not {queue!r}")
        sub = PgSubscription(self, uuid.uuid4().hex, pattern, queue, self.options.subscription_buffer)
        self._local[sub.id] = sub
        if queue is None:
            self._plain.add(pattern, sub)
        # Known to this process's publishers at once; to others when the NOTIFY arrives.
        self.interest.add(sub.id, pattern, queue)
        try:
            async with self.pool.acquire() as conn:
                await self._register(conn, sub)
        except BaseException:
            self._forget(sub)
            raise
        return sub

    async def _register(self, conn: asyncpg.Connection, sub: PgSubscription) -> None:
        delta = json.dumps({"t": "+", "id": sub.id, "p": sub.pattern, "q": sub.queue})
        await conn.execute(
            f"""WITH i AS (
                    INSERT INTO {self.names.interest} (subscription, pid, pattern, queue)
                    VALUES ($1, $2, $3, $4)
                    ON CONFLICT (subscription) DO UPDATE SET pid = excluded.pid)
                SELECT pg_notify($5, $6)""",
            sub.id,
            self.pid,
            sub.pattern,
            sub.queue,
            self.names.control_channel,
            delta,
        )

    def _forget(self, sub: PgSubscription) -> None:
        if self._local.pop(sub.id, None) is not None and sub.queue is None:
            self._plain.remove(sub.pattern, sub)
        self.interest.remove(sub.id)

    async def remove(self, sub: PgSubscription) -> None:
        self._forget(sub)
        if self.closed:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"""WITH d AS (DELETE FROM {self.names.interest} WHERE subscription = $1)
                    SELECT pg_notify($2, $3)""",
                sub.id,
                self.names.control_channel,
                json.dumps({"t": "-", "id": sub.id}),
            )

    # -- request-reply ---------------------------------------------------------------------------------

    async def request(self, subject: str, send: Callable[[str], Awaitable[None]], timeout: float) -> Message:
        """Send with ``send(reply_subject)`` and wait for the first reply on that inbox.

        NOTIFY cannot tell whether anyone listens, so no request fails with no responders:
        one that nobody answers times out.
        """
        self.check_open()
        inbox = f"{self.inbox_prefix}{next(self._requests)}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[inbox] = future
        try:
            await send(inbox)
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise RequestTimeoutError(f"no reply to request on {subject!r} within {timeout}s") from None
        finally:
            self._replies.pop(inbox, None)

    # -- closing -----------------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise TransportClosedError("the PostgreSQL transport is closed")

    async def close(self) -> None:
        if self.closed:
            return
        subscriptions = list(self._local.values())
        ids = [sub.id for sub in subscriptions]
        for sub in subscriptions:
            sub.closed = True
            sub._arrived.set()
        if ids:
            with contextlib.suppress(Exception):
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        f"""WITH d AS (DELETE FROM {self.names.interest} WHERE subscription = ANY($1))
                            SELECT pg_notify($2, json_build_object('t', '-', 'id', s)::text)
                            FROM unnest($1::text[]) s""",
                        ids,
                        self.names.control_channel,
                    )
        self.closed = True
        for sub in subscriptions:
            self._forget(sub)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(TransportClosedError("the PostgreSQL transport was closed"))
        for task in (self._dispatcher, self._reconnecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
