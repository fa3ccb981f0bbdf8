"""Consumer groups over Redis consumer groups: what both kinds share, and shared groups.

A pigeon group is a Redis consumer group of the same name on every partition stream of its
stream. Shared groups use Redis's model directly: a fetch moves entries into the group's
pending entries list (PEL) under the member's consumer name; the PEL's idle time is the lease
(``ack_wait``), its delivery counter is pigeon's ``delivery_count``. The delivery steps and the
settling steps are Lua scripts (`._lua`), so each is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.commands.core import AsyncScript

from ...engine.groups.base import check_fetch, check_nack_delay
from ...engine.groups.deadletter import Failures
from ...errors import AlreadySettledError, DeliveryNotOwnedError, GroupNotFoundError, TransportClosedError
from ...message import Message
from ..base import Consumer, ConsumerSpec
from ._codec import entry_message, failure_args, failures_from
from ._options import Keys, RedisOptions

log = logging.getLogger("pigeon.transport.redis")

# The pseudo-consumer that holds what a leaving member had not settled, until another member
# takes it (it cannot be a member's name: those are validated names without '~').
RELEASED = "~released"

DeadLetter = Callable[[Message, int, Failures], Awaitable[None]]


@dataclass
class GroupContext:
    """What a member needs from its transport."""

    client: redis.asyncio.Redis
    keys: Keys
    options: RedisOptions
    scripts: dict[str, AsyncScript]
    stream: str
    partitions: int
    spec: ConsumerSpec
    dead_letter: DeadLetter
    forget: Callable[[RedisMember], None]  # the transport stops tracking a closed member


class Delivery:
    """A message delivered to a member: settle it once (`pigeon.transport.base.Received`)."""

    __slots__ = ("_member", "_settled", "batch", "delivery_count", "entry_id", "message")

    def __init__(self, member: RedisMember, message: Message, entry_id: bytes, delivery_count: int) -> None:
        self.message = message
        self.delivery_count = delivery_count
        self.entry_id = entry_id
        self.batch: object = None  # ordered groups: the batch it belongs to
        self._member = member
        self._settled = False

    @property
    def partition(self) -> int:
        return self.message.partition  # type: ignore[return-value]

    @property
    def offset(self) -> int:
        return self.message.offset  # type: ignore[return-value]

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> None:
        if self._settled:
            raise AlreadySettledError(f"{self!r} was settled already")
        self._settled = True

    async def ack(self) -> None:
        self._settle()
        await self._member._ack(self)

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        check_nack_delay(delay)
        self._settle()
        await self._member._nack(self, delay, error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        self._settle()
        await self._member._term(self, reason)

    async def in_progress(self) -> None:
        if self._settled:
            raise AlreadySettledError(f"{self!r} was settled already")
        await self._member._in_progress(self)

    def __repr__(self) -> str:
        m = self.message
        return (
            f"<Delivery {m.subject!r} {m.stream}[{m.partition}]@{m.offset} "
            f"id={self.entry_id.decode()} delivery={self.delivery_count}>"
        )


class RedisMember(Consumer):
    """What both kinds of member share: fetch serialisation, closing, dead letters."""

    def __init__(self, ctx: GroupContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.closed = False
        self._fetching = asyncio.Lock()
        self._rotation = 0
        self.stream_keys = [ctx.keys.partition(ctx.stream, p) for p in range(ctx.partitions)]
        self.failures_key = ctx.keys.failures(ctx.stream, ctx.spec.group)

    def _script(self, name: str) -> AsyncScript:
        return self.ctx.scripts[name]

    def _check_open(self) -> None:
        if self.closed:
            raise TransportClosedError(f"member {self.name!r} of group {self.ctx.spec.group!r} is closed")

    def _next_rotation(self) -> int:
        # Start at a different partition each time so that one busy partition cannot starve others.
        self._rotation = (self._rotation + 1) % self.ctx.partitions
        return self._rotation

    def _deliveries(self, raw: Sequence[Any]) -> list[tuple[Delivery, int]]:
        """Script output (partition, id, count, fields, ...) as deliveries."""
        out = []
        for i in range(0, len(raw), 4):
            p, entry_id, count, fields = int(raw[i]), raw[i + 1], int(raw[i + 2]), raw[i + 3]
            message = entry_message(self.ctx.stream, p, entry_id, fields)
            out.append((Delivery(self, message, entry_id, count), count))
        return out

    async def _give_up(self, delivery: Delivery, count: int, record: bytes | str | None) -> None:
        """Dead-letter the message (when the group keeps dead letters)."""
        if self.ctx.spec.dead_letter:
            await self.ctx.dead_letter(delivery.message, count, failures_from(record))

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._script(name)(keys=list(keys), args=list(args))
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" in str(error):
                raise GroupNotFoundError(
                    f"group {self.ctx.spec.group!r} on stream {self.ctx.stream!r} no longer exists"
                ) from None
            raise

    async def _wait_for_new(self, keys: Sequence[str], count: int, block_ms: int) -> list[Any]:
        """Block on XREADGROUP for new entries of ``keys`` (Redis serves one key per wake-up)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.ctx.spec.group, self._consumer_name()]
        args += ["COUNT", count, "BLOCK", max(1, block_ms), "STREAMS", *keys, *([">"] * len(keys))]
        try:
            reply = await self.ctx.client.execute_command(*args)  # type: ignore[no-untyped-call]
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" in str(error):
                raise GroupNotFoundError(
                    f"group {self.ctx.spec.group!r} on stream {self.ctx.stream!r} no longer exists"
                ) from None
            raise
        return list(reply or [])

    def _consumer_name(self) -> str:
        return self.name

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ctx.forget(self)
        # A fetch in progress ends within one claim interval; then nothing new can arrive.
        async with self._fetching:
            await self._leave()

    async def _leave(self) -> None:
        raise NotImplementedError

    # settled by Delivery
    async def _ack(self, delivery: Delivery) -> None:
        raise NotImplementedError

    async def _nack(self, delivery: Delivery, delay: float | None, error: BaseException | str | None) -> None:
        raise NotImplementedError

    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None:
        raise NotImplementedError

    async def _in_progress(self, delivery: Delivery) -> None:
        raise NotImplementedError


class SharedMember(RedisMember):
    """A member of a shared group: any message to any member, each leased for ``ack_wait``."""

    def __init__(self, ctx: GroupContext, name: str) -> None:
        super().__init__(ctx, name)
        self._cursors = [b"0-0"] * ctx.partitions  # XAUTOCLAIM scan position per partition
        self._delayed_key = ctx.keys.delayed(ctx.stream, ctx.spec.group)
        self._ack_wait_ms = max(1, int(ctx.spec.ack_wait_s * 1000))

    async def fetch(self, max_messages: int = 100, timeout: float = 5.0) -> Sequence[Delivery]:
        check_fetch(max_messages, timeout)
        self._check_open()
        deadline = time.monotonic() + timeout
        async with self._fetching:
            while not self.closed:
                out, fresh, due_in_ms = await self._collect(max_messages)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = min(remaining, self.ctx.options.claim_interval_s)
                if due_in_ms >= 0:
                    wait = min(wait, due_in_ms / 1000)
                if fresh > 0:
                    reply = await self._wait_for_new(
                        self.stream_keys, min(max_messages, fresh), int(wait * 1000)
                    )
                    got = self._from_blocking_read(reply)
                    if self.closed:
                        return []  # closing releases them to the other members
                    if got:
                        return got
                else:
                    await asyncio.sleep(wait)  # at max_ack_pending: wait for settlements
            return []

    async def _collect(self, room: int) -> tuple[list[Delivery], int, int]:
        spec = self.ctx.spec
        keys = [self._delayed_key, self.failures_key, *self.stream_keys]
        args: list[Any] = [spec.group, self.name, room, self._ack_wait_ms, spec.max_ack_pending]
        args += [self._next_rotation(), *self._cursors]
        raw, cursors, fresh, due_in_ms = await self._run("fetch_shared", keys, args)
        self._cursors = list(cursors)
        out: list[Delivery] = []
        for delivery, count in self._deliveries(raw):
            if spec.max_deliver is not None and count > spec.max_deliver:
                # A lease expired on its last allowed delivery: give up instead of delivering.
                await self._expired_for_good(delivery, count)
                continue
            out.append(delivery)
        return out, int(fresh), int(due_in_ms)

    async def _expired_for_good(self, delivery: Delivery, count: int) -> None:
        reason = f"not acknowledged within ack_wait ({self.ctx.spec.ack_wait_s}s)"
        delivery._settled = True
        result = await self._fail(delivery, 0.0, reason, give_up=True)
        if result[0] == 2:
            await self._finish_give_up(delivery, count - 1, result[1])

    def _from_blocking_read(self, reply: list[Any]) -> list[Delivery]:
        out = []
        for key, entries in reply:
            p = self.stream_keys.index(key.decode() if isinstance(key, bytes) else key)
            for entry_id, fields in entries:
                message = entry_message(self.ctx.stream, p, entry_id, fields)
                out.append(Delivery(self, message, entry_id, 1))
        return out

    # -- settling -----------------------------------------------------------------------------

    def _field(self, delivery: Delivery) -> str:
        return f"{delivery.partition}|{delivery.entry_id.decode()}"

    def _not_owned(self, delivery: Delivery) -> DeliveryNotOwnedError:
        return DeliveryNotOwnedError(
            f"{delivery!r} is no longer held by member {self.name!r} (its lease expired and "
            "another delivery took over, or the member left)"
        )

    async def _ack(self, delivery: Delivery) -> None:
        keys = [self.stream_keys[delivery.partition], self.failures_key]
        args = [
            self.ctx.spec.group,
            self.name,
            delivery.entry_id,
            delivery.delivery_count,
            self._field(delivery),
        ]
        if not await self._run("ack_shared", keys, args):
            raise self._not_owned(delivery)

    async def _fail(
        self, delivery: Delivery, delay: float, error: BaseException | str | None, *, give_up: bool
    ) -> list[Any]:
        spec = self.ctx.spec
        keys = [self.stream_keys[delivery.partition], self._delayed_key, self.failures_key]
        args: list[Any] = [spec.group, self.name, delivery.entry_id, delivery.delivery_count]
        args += [self._field(delivery), int(delay * 1000), repr(time.time()), *failure_args(error)]
        args += ["1" if give_up else "0", spec.max_deliver or 0]
        result: list[Any] = await self._run("fail_shared", keys, args)
        if result[0] == 0:
            raise self._not_owned(delivery)
        return result

    async def _finish_give_up(self, delivery: Delivery, count: int, record: bytes) -> None:
        await self._give_up(delivery, count, record)
        keys = [self.stream_keys[delivery.partition], self.failures_key]
        args = [
            self.ctx.spec.group,
            self.name,
            delivery.entry_id,
            delivery.delivery_count,
            self._field(delivery),
        ]
        if not await self._run("ack_shared", keys, args):
            # Dead-lettered, but the lease moved meanwhile: the next holder gives up again, and
            # the dead letter's id makes that a duplicate.
            raise self._not_owned(delivery)

    async def _nack(self, delivery: Delivery, delay: float | None, error: BaseException | str | None) -> None:
        if delay is None:
            backoff = self.ctx.spec.backoff
            delay = backoff.delay(delivery.delivery_count) if backoff else 0.0
        result = await self._fail(delivery, delay, error, give_up=False)
        if result[0] == 2:
            await self._finish_give_up(delivery, delivery.delivery_count, result[1])

    async def _term(self, delivery: Delivery, reason: BaseException | str | None) -> None:
        result = await self._fail(delivery, 0.0, reason or "terminated", give_up=True)
        await self._finish_give_up(delivery, delivery.delivery_count, result[1])

    async def _in_progress(self, delivery: Delivery) -> None:
        keys = [self.stream_keys[delivery.partition]]
        args = [self.ctx.spec.group, self.name, delivery.entry_id, delivery.delivery_count]
        if not await self._run("touch_shared", keys, args):
            raise self._not_owned(delivery)

    async def _leave(self) -> None:
        args = [self.ctx.spec.group, self.name, RELEASED, self._ack_wait_ms]
        with contextlib.suppress(GroupNotFoundError):
            await self._run("release", self.stream_keys, args)
