"""Dead letters: where a group puts the messages it gives up on, and what it writes on them.

A group's dead-letter stream is an ordinary stream named ``<stream>-<group>-dlq`` capturing
``$DLQ.<stream>.<group>``. The group creates it on first use with unlimited retention; to
give dead letters their own retention, create that stream yourself beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from ...errors import InvalidNameError
from ...message import Headers, Message
from ..config import StreamConfig, validate_name


def dead_letter_stream(stream: StreamConfig, group: str) -> StreamConfig:
    name = f"{stream.name}-{group}-dlq"
    try:
        validate_name(name)
    except InvalidNameError:
        raise InvalidNameError(
            f"group {group!r} on stream {stream.name!r}: the dead-letter stream name {name!r} "
            "would exceed 64 characters; use shorter names or dead_letter=False"
        ) from None
    return StreamConfig(
        name=name,
        subjects=(dead_letter_subject(stream.name, group),),
        durability=stream.durability,
        fsync_interval_ms=stream.fsync_interval_ms,
    )


def dead_letter_subject(stream: str, group: str) -> str:
    return f"$DLQ.{stream}.{group}"


class ReportedError(Exception):
    """An error raised elsewhere (a remote member's handler), known by its type name and text."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


@dataclass
class Failures:
    """What went wrong with one message so far (kept in memory while it is in flight)."""

    first_at: float = 0.0
    last_at: float = 0.0
    error_type: str = ""
    error_message: str = ""
    history: list[str] = field(default_factory=list)

    def note(self, error: BaseException | str | None, now: float) -> None:
        if not self.first_at:
            self.first_at = now
        self.last_at = now
        if isinstance(error, ReportedError):
            self.error_type, self.error_message = error.type_name, str(error)
        elif isinstance(error, BaseException):
            self.error_type, self.error_message = type(error).__name__, str(error)
        elif error is not None:
            self.error_type, self.error_message = "Error", error


def dead_letter_message(
    original: Message, group: str, delivery_count: int, failures: Failures, subject: str
) -> Message:
    """The dead letter for ``original``: its payload, key and headers, plus why and where."""
    headers = dict(original.headers)
    error_type = failures.error_type or "MaxDeliveriesExceeded"
    error_message = failures.error_message or f"gave up after {delivery_count} deliveries"
    headers.update(
        {
            Headers.FAILURE_REASON: f"{error_type}: {error_message}",
            Headers.ERROR_TYPE: error_type,
            Headers.ERROR_MESSAGE: error_message,
            Headers.DELIVERY_COUNT: str(delivery_count),
            Headers.FIRST_FAILURE_AT: _iso(failures.first_at),
            Headers.LAST_FAILURE_AT: _iso(failures.last_at),
            Headers.GROUP: group,
            Headers.ORIGINAL_STREAM: str(original.stream),
            Headers.ORIGINAL_PARTITION: str(original.partition),
            Headers.ORIGINAL_OFFSET: str(original.offset),
            Headers.ORIGINAL_SUBJECT: headers.get(Headers.ORIGINAL_SUBJECT, original.subject),
            # A retried or redriven copy keeps the id of the message it copies.
            Headers.ORIGINAL_MSG_ID: headers.get(Headers.ORIGINAL_MSG_ID, original.id),
        }
    )
    # The id makes a repeated dead-lettering (after a crash mid-way) a duplicate, not a copy.
    return Message(
        subject,
        original.payload,
        key=original.key,
        headers=headers,
        id=f"dlq:{original.stream}:{original.partition}:{original.offset}",
    )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else ""
