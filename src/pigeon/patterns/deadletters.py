"""Dead-letter management: list, redrive and purge a group's dead letters, and redrive them
automatically with a poison guard.

Every transport keeps a group's dead letters in the stream ``<stream>-<group>-dlq``, but
reading that stream cannot tell which letters were dealt with. So the box is an admin shared
group, ``pigeon-dlq``, on that stream: a letter is pending until that group acknowledges it.
Each call joins that group, fetches every pending letter (oldest first: by the time it was
stored), acks the ones it redrives or purges, nacks the others (they stay) and leaves. The
box is therefore durable, shared by every process, and built on the Transport contract
only; a `DeadLetters` holds nothing between calls. A group whose dead-letter stream does not
exist yet (NATS and Redis create it at the first dead letter) has an empty box.

Redrive publishes a copy of the original back to its subject: same payload, key and headers
minus the failure and location headers, with ``Pigeon-Original-Msg-Id`` kept (idempotent
consumers recognise it), ``Pigeon-Redrive-Count`` one higher and ``Pigeon-Redrive-For`` naming
the group (pigeon's handlers in the stream's other groups acknowledge it unprocessed). It is
a new message to the group: its delivery count starts at 1. The copy is published before the
letter is acknowledged, so a crash in between redrives it twice at worst; where the transport
deduplicates (``capabilities.dedup``) the copy's id, ``redrive:<group>:<original id>:<count>``,
makes the second one a duplicate. RabbitMQ has no dedup: there the copy gets a fresh id.

One call works on what the admin group hands out within a third of its 10 s ack wait, up
to 10,000 letters: a bigger box takes several calls (`redrive` and `purge` return how many
they handled), and `list` and `count` see those first. A process that dies mid-call leaves
the letters it held out of sight for those 10 s. Calls on one `DeadLetters` are serialised;
two calls from different processes at the same moment each see only the letters the other
is not holding.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..engine.config import validate_name
from ..errors import (
    DeliveryNotOwnedError,
    InvalidConfigError,
    InvalidMessageError,
    NoStreamForSubjectError,
    StreamNotFoundError,
)
from ..message import Headers, Message
from ..transport.base import Consumer, ConsumerSpec, Received, Transport

__all__ = ["ADMIN_GROUP", "DeadLetter", "DeadLetters", "RedriveReport"]

ADMIN_GROUP = "pigeon-dlq"
"""The shared group, on each dead-letter stream, whose acknowledgements take letters out of the box."""
# Fixed, not options: every process's admin member must join the group with the same settings.
_ADMIN_SPEC = ConsumerSpec(
    ADMIN_GROUP, kind="shared", ack_wait_s=10.0, max_deliver=None, max_ack_pending=10_000, dead_letter=False
)

# Where and why the original failed: true of the dead letter, not of the copy sent back.
_NOT_REDRIVEN = frozenset(
    {
        Headers.MSG_ID,
        Headers.DELIVERY_COUNT,
        Headers.ERROR_TYPE,
        Headers.ERROR_MESSAGE,
        Headers.FAILURE_REASON,
        Headers.FIRST_FAILURE_AT,
        Headers.LAST_FAILURE_AT,
        Headers.GROUP,
        Headers.ORIGINAL_STREAM,
        Headers.ORIGINAL_PARTITION,
        Headers.ORIGINAL_OFFSET,
        # A redrive starts the message over, retries included.
        Headers.ATTEMPT,
        Headers.NEXT_RETRY_AT,
    }
)
_FETCH = 500  # letters asked for per fetch
_CHUNK = 100  # redrive copies published, and letters settled, at a time


@dataclass(frozen=True)
class DeadLetter:
    """One pending dead letter, with its failure headers parsed.

    ``id`` selects it in `DeadLetters.redrive` and `DeadLetters.purge`: the original's id and
    how many times it was redriven, ``<original_msg_id>:<redrive_count>``, naming one failure
    of one message. It is not the letter's own message id, which the engine derives from the
    original's offset, unknown to RabbitMQ's shared groups (every letter there has the same).
    Two copies of one letter (stored twice, at least once) share the id and go together.
    """

    message: Message
    id: str
    original_subject: str
    original_msg_id: str
    error_type: str
    error_message: str
    failed_at: datetime | None
    redrive_count: int
    age_s: float

    def summary(self) -> dict[str, Any]:
        """Its fields as JSON values, without the message (each caller shows that its own way)."""
        return {
            "id": self.id,
            "original_subject": self.original_subject,
            "original_msg_id": self.original_msg_id,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "redrive_count": self.redrive_count,
            "age_s": round(self.age_s, 3),
        }

    @classmethod
    def parse(cls, message: Message, now: float) -> DeadLetter:
        headers = message.headers
        original_msg_id = headers.get(Headers.ORIGINAL_MSG_ID) or message.id
        redrive_count = _int(headers.get(Headers.REDRIVE_COUNT))
        failed_at = _datetime(headers.get(Headers.LAST_FAILURE_AT))
        since = message.timestamp if failed_at is None else failed_at.timestamp()
        return cls(
            message=message,
            id=f"{original_msg_id}:{redrive_count}",
            original_subject=headers.get(Headers.ORIGINAL_SUBJECT, ""),
            original_msg_id=original_msg_id,
            error_type=headers.get(Headers.ERROR_TYPE, ""),
            error_message=headers.get(Headers.ERROR_MESSAGE, ""),
            failed_at=failed_at,
            redrive_count=redrive_count,
            age_s=max(0.0, now - since),
        )


@dataclass(frozen=True)
class RedriveReport:
    """One `DeadLetters.auto_redrive` pass: letters sent back, and letters left in the box
    for good (redriven ``max_redrives`` times already, or with no subject to go back to)."""

    redriven: int
    parked: int


@dataclass(eq=False)
class _Held:
    letter: DeadLetter
    deliveries: list[Received]  # more than one when the admin group handed the letter out twice
    settled: bool = False


class DeadLetters:
    """The dead letters of ``group`` on ``stream``."""

    def __init__(self, transport: Transport, stream: str, group: str, *, quiet_s: float = 0.25) -> None:
        """``quiet_s``: how long no new letter may arrive before the box counts as read."""
        validate_name(stream)
        validate_name(group, "group")
        if isinstance(quiet_s, bool) or not isinstance(quiet_s, int | float) or quiet_s <= 0:
            raise InvalidConfigError(f"quiet_s must be a positive number, not {quiet_s!r}")
        self.transport = transport
        self.stream = stream
        self.group = group
        self.dead_letter_stream = validate_name(f"{stream}-{group}-dlq")
        self._quiet_s = quiet_s
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<DeadLetters of group {self.group!r} on stream {self.stream!r}>"

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """The pending letters, oldest first; they stay pending."""
        _positive(limit, "limit")
        async with self._box() as held:
            return [h.letter for h in held[:limit]]

    async def count(self) -> int:
        """How many letters are pending (up to 10,000)."""
        async with self._box() as held:
            return len(held)

    async def redrive(
        self,
        ids: Iterable[str] | None = None,
        *,
        where: Callable[[DeadLetter], bool] | None = None,
        all: bool = False,
        progress: Callable[[int, int], object] | None = None,
    ) -> int:
        """Send the chosen letters back to their subjects, oldest first; how many were sent.

        ``progress(sent, total)`` is called as each chunk of letters is sent (for a progress bar).
        """
        chosen = _selector(ids, where, all)
        async with self._box() as held:
            picked = [h for h in held if chosen(h.letter)]
            for h in picked:
                if not h.letter.original_subject:
                    raise InvalidMessageError(
                        f"dead letter {h.letter.id!r} has no {Headers.ORIGINAL_SUBJECT} header, so "
                        "nowhere to go back to: purge it instead"
                    )
            await self._redrive(picked, progress)
            return len(picked)

    async def purge(
        self,
        ids: Iterable[str] | None = None,
        *,
        where: Callable[[DeadLetter], bool] | None = None,
        all: bool = False,
    ) -> int:
        """Take the chosen letters out of the box for good; how many were taken."""
        chosen = _selector(ids, where, all)
        async with self._box() as held:
            picked = [h for h in held if chosen(h.letter)]
            await _each(picked, _ack)
            return len(picked)

    async def auto_redrive(self, *, min_age_s: float, max_redrives: int) -> RedriveReport:
        """One pass of the redrive policy: letters at least ``min_age_s`` old go back unless
        they were redriven ``max_redrives`` times already (the poison guard: those stay,
        counted as parked, for a person to look at)."""
        if isinstance(min_age_s, bool) or not isinstance(min_age_s, int | float) or min_age_s < 0:
            raise InvalidConfigError(f"min_age_s must be a number >= 0, not {min_age_s!r}")
        if isinstance(max_redrives, bool) or not isinstance(max_redrives, int) or max_redrives < 0:
            raise InvalidConfigError(f"max_redrives must be an integer >= 0, not {max_redrives!r}")
        parked = 0
        due: list[_Held] = []
        async with self._box() as held:
            for h in held:
                if h.letter.redrive_count >= max_redrives or not h.letter.original_subject:
                    parked += 1
                elif h.letter.age_s >= min_age_s:
                    due.append(h)
            await self._redrive(due)
        return RedriveReport(redriven=len(due), parked=parked)

    async def close(self) -> None:
        """Wait for the call in progress, if any, to hand its letters back (call it before
        closing the transport)."""
        async with self._lock:
            pass

    # -- internals ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _box(self) -> AsyncIterator[builtins.list[_Held]]:
        """The pending letters, oldest first, held for the caller; those it did not settle go back."""
        async with self._lock:
            consumer: Consumer | None = None
            try:
                consumer = await self.transport.consumer(self.dead_letter_stream, _ADMIN_SPEC)
            except StreamNotFoundError:
                await self.transport.stream_state(self.stream)  # a stream that does not exist is a mistake
            if consumer is None:
                yield []  # no dead letter yet
                return
            # Leaving after each call: a member that stayed would keep what the engine pushes
            # it (RabbitMQ prefetches), out of other processes' sight.
            held: builtins.list[_Held] = []
            try:
                held = await self._drain(consumer)
                yield held
            finally:
                try:
                    # A letter whose lease ran out is back in the box already.
                    await _each([h for h in held if not h.settled], _nack)
                finally:
                    await consumer.close()

    async def _drain(self, consumer: Consumer) -> builtins.list[_Held]:
        loop = asyncio.get_running_loop()
        # Settled well before the admin group's leases run out.
        deadline = loop.time() + _ADMIN_SPEC.ack_wait_s / 3
        most = _ADMIN_SPEC.max_ack_pending
        deliveries: list[Received] = []
        idle = False
        while len(deliveries) < most and loop.time() < deadline:
            # Polled, not long-polled: a long-poll can outlive its fetch on the engine (a NATS
            # pull request does) and would take the letters this call hands back at its end.
            batch = await consumer.fetch(min(_FETCH, most - len(deliveries)), 0)
            if batch:
                deliveries.extend(batch)
                idle = False
            elif idle:
                break
            else:
                await asyncio.sleep(self._quiet_s)
                idle = True
        now = time.time()
        held: dict[tuple[object, ...], _Held] = {}
        for received in deliveries:
            m = received.message
            twin = held.get(key := (m.id, m.partition, m.offset, m.timestamp))
            if twin is None:
                held[key] = _Held(DeadLetter.parse(m, now), [received])
            else:
                twin.deliveries.append(received)
        return sorted(held.values(), key=lambda h: (h.letter.message.timestamp, h.letter.message.offset or 0))

    async def _redrive(
        self, picked: Sequence[_Held], progress: Callable[[int, int], object] | None = None
    ) -> None:
        for start in range(0, len(picked), _CHUNK):
            chunk = picked[start : start + _CHUNK]
            acks = await self.transport.publish_batch([self._copy(h.letter) for h in chunk])
            stored = [h for h, ack in zip(chunk, acks, strict=True) if ack is not None]
            await _each(stored, _ack)
            if len(stored) < len(chunk):
                lost = next(h.letter for h, ack in zip(chunk, acks, strict=True) if ack is None)
                raise NoStreamForSubjectError(
                    f"no stream captures {lost.original_subject!r} any more: dead letter {lost.id!r} "
                    "was not redriven and stays in the box"
                )
            if progress is not None:
                progress(start + len(chunk), len(picked))

    def _copy(self, letter: DeadLetter) -> Message:
        headers = {k: v for k, v in letter.message.headers.items() if k not in _NOT_REDRIVEN}
        count = letter.redrive_count + 1
        headers[Headers.ORIGINAL_MSG_ID] = letter.original_msg_id
        headers[Headers.REDRIVE_COUNT] = str(count)
        headers[Headers.REDRIVE_FOR] = self.group
        # The group is part of the id: two groups redriving the same message are two copies.
        msg_id = f"redrive:{self.group}:{letter.original_msg_id}:{count}"
        return Message(
            letter.original_subject,
            letter.message.payload,
            key=letter.message.key,
            headers=headers,
            id=msg_id if self.transport.capabilities.dedup else None,
        )


def _selector(
    ids: Iterable[str] | None, where: Callable[[DeadLetter], bool] | None, everything: bool
) -> Callable[[DeadLetter], bool]:
    choices = (("ids", ids), ("where", where), ("all", everything or None))
    given = [name for name, value in choices if value is not None]
    if len(given) != 1:
        raise InvalidConfigError(
            "choose the dead letters with exactly one of ids=[...], where=<predicate> or all=True"
            + (f", not {' and '.join(given)}" if given else "")
        )
    if everything:
        return lambda _letter: True
    if where is not None:
        if not callable(where):
            raise InvalidConfigError(f"where must be a function of a DeadLetter, not {type(where).__name__}")
        return where
    assert ids is not None
    if isinstance(ids, str | bytes):
        raise InvalidConfigError(
            f"ids must be a collection of dead-letter ids, not one string: use [{ids!r}]"
        )
    wanted = set(ids)
    return lambda letter: letter.id in wanted


async def _ack(held: _Held) -> None:
    held.settled = True
    lost: list[DeliveryNotOwnedError] = []
    for received in held.deliveries:
        try:
            await received.ack()
        except DeliveryNotOwnedError as error:
            lost.append(error)
    # A letter handed out twice is held by one of its deliveries; if by none, it is back in the box.
    if len(lost) == len(held.deliveries):
        raise lost[0]


async def _nack(held: _Held) -> None:
    held.settled = True
    for received in held.deliveries:
        with contextlib.suppress(DeliveryNotOwnedError):
            await received.nack()


async def _each(items: Sequence[_Held], settle: Callable[[_Held], Awaitable[None]]) -> None:
    for start in range(0, len(items), _CHUNK):
        chunk = items[start : start + _CHUNK]
        for result in await asyncio.gather(*(settle(h) for h in chunk), return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def _datetime(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
