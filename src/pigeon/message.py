"""The message model and the header vocabulary pigeon itself carries.

A `Message` is what publishers hand to pigeon and what consumers get back. Once stored it
also knows where it lives: stream, partition and offset.

Ids are UUIDv7 strings (time-ordered, RFC 9562). Ids that pigeon generates for one batch
share a random base and count up from it (RFC 9562 method 3, a monotonic counter), so a
batch's ids are ordered and the storage engine only has to keep the base. A publisher may
supply its own id instead (any text); that id is then used for deduplication.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from typing import Final

__all__ = ["Headers", "Message", "format_id", "new_id", "new_id_base"]


class Headers:
    """Names of the headers pigeon sets and reads. Users may read them; they should not forge them."""

    MSG_ID: Final = "Pigeon-Msg-Id"
    """The message id, carried as a header on transports with no native id field."""
    DELIVERY_COUNT: Final = "Pigeon-Delivery-Count"
    """How many times this message has been delivered to the current group (1 on first delivery)."""
    NEXT_RETRY_AT: Final = "Pigeon-Next-Retry-At"
    """When a message in a retry stream becomes due again (UTC, ISO 8601)."""
    FAILURE_REASON: Final = "Pigeon-Failure-Reason"
    """Why the last processing attempt failed: ``ExceptionType: message``."""
    ORIGINAL_SUBJECT: Final = "Pigeon-Original-Subject"
    """The subject a message was first published to, kept when it moves to a retry or dead-letter stream."""
    CORRELATION_ID: Final = "Pigeon-Correlation-Id"
    """The id shared by every message caused, directly or not, by one original message."""
    CAUSATION_ID: Final = "Pigeon-Causation-Id"
    """The id of the message whose handling published this one."""

    ERROR_TYPE: Final = "Pigeon-Error-Type"
    """On a dead letter: the class name of the last error."""
    ERROR_MESSAGE: Final = "Pigeon-Error-Message"
    """On a dead letter: the text of the last error."""
    FIRST_FAILURE_AT: Final = "Pigeon-First-Failure-At"
    """On a dead letter: when processing first failed (UTC, ISO 8601)."""
    LAST_FAILURE_AT: Final = "Pigeon-Last-Failure-At"
    """On a dead letter: when processing last failed (UTC, ISO 8601)."""
    GROUP: Final = "Pigeon-Group"
    """On a dead letter: the consumer group that gave up on the message."""
    ORIGINAL_STREAM: Final = "Pigeon-Original-Stream"
    ORIGINAL_PARTITION: Final = "Pigeon-Original-Partition"
    ORIGINAL_OFFSET: Final = "Pigeon-Original-Offset"
    """On a dead letter: where the original message is stored."""
    ORIGINAL_MSG_ID: Final = "Pigeon-Original-Msg-Id"
    """On a dead letter or a retry: the id of the original message."""
    REDRIVE_COUNT: Final = "Pigeon-Redrive-Count"
    """How many times a message was sent back from the dead letters to its subject."""
    REDRIVE_FOR: Final = "Pigeon-Redrive-For"
    """On a redriven message: the one group it is meant for; pigeon's handlers in other
    groups acknowledge it without processing (they handled the original already)."""
    ATTEMPT: Final = "Pigeon-Attempt"
    """On a message in a retry stream: the attempt it is due for (2 for the first retry)."""
    CONTENT_TYPE: Final = "Content-Type"
    """How the payload is encoded (``application/json``, ``text/plain``, ...)."""
    REPLY_TO: Final = "Pigeon-Reply-To"
    """On a request received by a subscriber: the subject its reply goes to (NATS's reply
    subject, or an inbox pigeon made). `Transport.reply` uses it."""

    ALL: Final = (
        MSG_ID,
        DELIVERY_COUNT,
        NEXT_RETRY_AT,
        FAILURE_REASON,
        ORIGINAL_SUBJECT,
        CORRELATION_ID,
        CAUSATION_ID,
        ERROR_TYPE,
        ERROR_MESSAGE,
        FIRST_FAILURE_AT,
        LAST_FAILURE_AT,
        GROUP,
        ORIGINAL_STREAM,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        ORIGINAL_MSG_ID,
        REDRIVE_COUNT,
        REDRIVE_FOR,
        ATTEMPT,
        CONTENT_TYPE,
        REPLY_TO,
    )


_RAND_B_BITS = 62
# Keeping the top bit of the counter clear leaves room for 2**61 ids per base without a carry
# into the variant bits.
_COUNTER_SPACE = 1 << (_RAND_B_BITS - 1)


def new_id_base(now_ms: int | None = None) -> int:
    """A fresh UUIDv7 as an integer; adding n < 2**61 to it gives the n-th id of a batch."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand % _COUNTER_SPACE
    return (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b


def format_id(value: int) -> str:
    """The canonical text form of a UUID held as an integer."""
    return str(uuid.UUID(int=value))


def new_id() -> str:
    """A fresh, time-ordered, unique message id."""
    return format_id(new_id_base())


class Message:
    """One message: subject, optional key, payload bytes, text headers, id and timestamp.

    ``stream``, ``partition`` and ``offset`` are set once the message is stored.
    """

    __slots__ = (
        "_headers",
        "_id",
        "_id_number",
        "key",
        "offset",
        "partition",
        "payload",
        "stream",
        "subject",
        "timestamp",
    )

    def __init__(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        timestamp: float | None = None,
        stream: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.key = key
        self._headers: dict[str, str] | None = dict(headers) if headers else None
        self._id = id
        self._id_number: int | None = None
        self.timestamp = time.time() if timestamp is None else timestamp
        self.stream = stream
        self.partition = partition
        self.offset = offset

    @property
    def headers(self) -> dict[str, str]:
        """Text headers; created on first access (most stored messages have none)."""
        if self._headers is None:
            self._headers = {}
        return self._headers

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._headers = value

    @property
    def id(self) -> str:
        """The message id; generated on first access when neither publisher nor storage gave one."""
        if self._id is None:
            number = self._id_number
            self._id = format_id(new_id_base() if number is None else number)
        return self._id

    @property
    def has_explicit_id(self) -> bool:
        """True when the publisher chose this message's id (it is then used for deduplication)."""
        return self._id is not None and self._id_number is None

    def __repr__(self) -> str:
        where = "" if self.offset is None else f" at {self.stream}[{self.partition}]@{self.offset}"
        return f"<Message {self.subject!r} id={self.id}{where} {len(self.payload)} bytes>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.id == other.id
            and self.subject == other.subject
            and self.payload == other.payload
            and self.key == other.key
            and self.headers == other.headers
        )

    __hash__ = None  # type: ignore[assignment]
