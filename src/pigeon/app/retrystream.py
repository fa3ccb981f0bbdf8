"""The retry stream: delayed retries for engines that cannot delay a redelivery.

One stream per group (``<stream>-<group>-retry`` on ``$RETRY.<stream>.<group>``), whatever
the delays: each copy says when it is due (``Pigeon-Next-Retry-At``) and which attempt it
is; the group's retry consumer waits for that time, holding the copy's lease. When the
attempts run out the message is written to the group's usual dead-letter stream.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from ..engine.config import validate_name
from ..engine.groups.deadletter import Failures, dead_letter_message, dead_letter_subject
from ..errors import InvalidConfigError, InvalidNameError
from ..message import Headers, Message
from ..transport.base import StreamSpec, Transport

# Headers that describe one hop through the retry stream, dropped when the message is rebuilt.
_HOP_HEADERS = (
    Headers.NEXT_RETRY_AT,
    Headers.ATTEMPT,
    Headers.ORIGINAL_STREAM,
    Headers.ORIGINAL_PARTITION,
    Headers.ORIGINAL_OFFSET,
    Headers.FAILURE_REASON,
)


def dedup_id(transport: Transport, msg_id: str) -> str | None:
    """``msg_id`` where the transport deduplicates by id (a repeat after a crash is then
    dropped); None where it cannot (RabbitMQ), and consumers' idempotency covers repeats."""
    return msg_id if transport.capabilities.dedup else None


def retry_stream(stream: str, group: str) -> StreamSpec:
    name = f"{stream}-{group}-retry"
    try:
        validate_name(name)
    except InvalidNameError:
        raise InvalidConfigError(
            f"group {group!r} on stream {stream!r}: the retry stream name {name!r} is too long; "
            "use shorter names or another retry strategy"
        ) from None
    return StreamSpec(name, (f"$RETRY.{stream}.{group}",))


def retry_copy(
    message: Message, attempt: int, delay: float, error: BaseException
) -> tuple[dict[str, str], str]:
    """Headers for the copy due for ``attempt`` after ``delay`` seconds, and its dedup id."""
    headers = dict(message.headers)
    original_id = headers.setdefault(Headers.ORIGINAL_MSG_ID, message.id)
    headers.setdefault(Headers.ORIGINAL_SUBJECT, message.subject)
    headers[Headers.ORIGINAL_STREAM] = str(message.stream)
    headers[Headers.ORIGINAL_PARTITION] = str(message.partition)
    headers[Headers.ORIGINAL_OFFSET] = str(message.offset)
    headers[Headers.ATTEMPT] = str(attempt)
    headers[Headers.NEXT_RETRY_AT] = datetime.fromtimestamp(time.time() + delay, UTC).isoformat()
    headers[Headers.FAILURE_REASON] = f"{type(error).__name__}: {error}"
    return headers, f"retry:{original_id}:{attempt}"


def due_at(message: Message) -> float:
    """When a retry copy is due (epoch seconds); a copy without the header is due now."""
    text = message.headers.get(Headers.NEXT_RETRY_AT)
    try:
        return datetime.fromisoformat(text).timestamp() if text else 0.0
    except ValueError:
        return 0.0


def attempt_of(message: Message) -> int:
    try:
        return max(1, int(message.headers.get(Headers.ATTEMPT, "1")))
    except ValueError:
        return 1


def rebuild(copy: Message) -> Message:
    """The message as the handler first saw it: its subject, id and place in the stream."""
    headers = {k: v for k, v in copy.headers.items() if k not in _HOP_HEADERS}
    original_id = headers.get(Headers.ORIGINAL_MSG_ID, copy.id)
    subject = headers.pop(Headers.ORIGINAL_SUBJECT, copy.subject)
    place = copy.headers
    return Message(
        subject,
        copy.payload,
        key=copy.key,
        headers=headers,
        id=original_id,
        timestamp=copy.timestamp,
        stream=place.get(Headers.ORIGINAL_STREAM),
        partition=int(place.get(Headers.ORIGINAL_PARTITION, "0")),
        offset=int(place.get(Headers.ORIGINAL_OFFSET, "0")),
    )


async def dead_letter(
    transport: Transport, stream: str, group: str, message: Message, attempts: int, error: BaseException
) -> None:
    """Write ``message`` to the group's dead letters, as the engine would on its own give-up."""
    now = time.time()
    failures = Failures(first_at=now, last_at=now, error_type=type(error).__name__, error_message=str(error))
    subject = dead_letter_subject(stream, group)
    letter = dead_letter_message(message, group, attempts, failures, subject)

    async def send() -> object:
        return await transport.publish(
            letter.subject,
            letter.payload,
            key=letter.key,
            headers=letter.headers,
            msg_id=dedup_id(transport, letter.id),
        )

    if await send() is None:
        # No dead-letter stream yet (engines that create it on the first give-up).
        await transport.create_stream(StreamSpec(f"{stream}-{group}-dlq", (subject,)))
        await send()
