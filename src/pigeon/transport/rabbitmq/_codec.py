"""How pigeon messages travel as AMQP messages, and subjects as routing keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...engine.groups.deadletter import Failures
from ...errors import InvalidMessageError, InvalidSubjectError
from ...message import Headers, Message
from ...subjects import validate_pattern

# AMQP routing and binding keys are short strings.
MAX_ROUTING_KEY = 255
# The first word of every routing key on the core exchange: the partition of a stored
# message (it comes through its stream's exchange), or this for a core-only publish.
CORE_WORD = "_"

# pigeon's own data rides in headers under this prefix (AMQP has no key, no sub-second
# timestamp, no partition). Integers, not floats: pamqp encodes floats in single precision.
H_KEY = "x-pigeon-key"
H_TS = "x-pigeon-ts-us"
H_SUBJECT = "x-pigeon-subject"  # on copies whose routing key is a queue name
H_PARTITION = "x-pigeon-p"
H_OFFSET = "x-pigeon-offset"  # on copies made from a stream queue
H_DELIVERIES = "x-pigeon-deliveries"  # deliveries before this copy was made (a nack)
H_PURGES = "x-pigeon-purges"  # how many purges of its stream its publisher had seen
H_FIRST_FAILURE = "x-pigeon-first-failure-us"
H_LAST_FAILURE = "x-pigeon-last-failure-us"
H_ERROR_TYPE = "x-pigeon-error-type"
H_ERROR_MESSAGE = "x-pigeon-error-message"

# Header names pigeon or RabbitMQ set: refused on publish, removed on receipt.
_RESERVED = (
    "x-pigeon-",
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
    "x-stream-offset",
    "x-received-from",
)

PERSISTENT = 2
TRANSIENT = 1


def routing_key(first_word: str, subject: str) -> str:
    key = f"{first_word}.{subject}"
    if len(key) * 4 > MAX_ROUTING_KEY and len(key.encode()) > MAX_ROUTING_KEY:
        raise InvalidSubjectError(
            f"subject {subject[:80]!r} is too long for RabbitMQ: routing keys hold "
            f"{MAX_ROUTING_KEY} bytes, {len(first_word) + 1} of which pigeon uses"
        )
    return key


def subject_of(key: str) -> str:
    """The subject in a routing key (after its partition or core word)."""
    return key.partition(".")[2]


def binding_key(pattern: str) -> tuple[str, bool]:
    """The AMQP binding key for a pigeon pattern, and whether it matches exactly.

    ``*`` is one word in both syntaxes. NATS's ``>`` is one or more words; AMQP's ``#`` is
    zero or more, so ``>`` becomes ``*.#``. A literal token ``#`` (legal in pigeon) is a
    wildcard to RabbitMQ: such a binding over-matches and subscribers filter locally.
    """
    tokens = validate_pattern(pattern).split(".")
    exact = "#" not in tokens
    words = ["*.#" if token == ">" else token for token in tokens]
    return routing_key("*", ".".join(words)), exact


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidMessageError(f"header {name!r}: names and values must be str")
        if not name or len(name.encode()) > 255:
            raise InvalidMessageError(f"header {name[:80]!r}: AMQP header names hold 1 to 255 bytes")
        if name.lower().startswith(_RESERVED):
            raise InvalidMessageError(
                f"header {name!r}: names starting with {', '.join(_RESERVED)} are reserved "
                "for pigeon and RabbitMQ"
            )
        out[name] = value
    return out


def check_payload(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")


def properties(
    msg_id: str,
    headers: Mapping[str, Any] | None,
    key: str | None,
    timestamp: float,
    *,
    persistent: bool,
    reply_to: str | None = None,
    expiration: str | None = None,
) -> Basic.Properties:
    table: dict[str, Any] = dict(headers) if headers else {}
    table[H_TS] = int(timestamp * 1_000_000)
    if key is not None:
        table[H_KEY] = key
    return Basic.Properties(
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        message_id=msg_id,
        headers=table,
        reply_to=reply_to,
        expiration=expiration,
    )


def user_headers(table: Mapping[str, Any] | None) -> dict[str, str]:
    if not table:
        return {}
    return {
        name: value if isinstance(value, str) else str(value)
        for name, value in table.items()
        if not name.lower().startswith(_RESERVED)
    }


def timestamp_of(table: Mapping[str, Any] | None) -> float | None:
    value = table.get(H_TS) if table else None
    return value / 1_000_000 if isinstance(value, int) else None


def decode(
    delivered: DeliveredMessage,
    *,
    stream: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    reply_to_header: bool = False,
) -> Message:
    """A pigeon `Message` from an AMQP delivery (subject from the routing key unless a copy
    names it in a header)."""
    props = delivered.header.properties
    table = props.headers or {}
    subject = table.get(H_SUBJECT)
    if not isinstance(subject, str):
        subject = subject_of(delivered.routing_key or "")
    headers = user_headers(table)
    if reply_to_header and props.reply_to:
        headers[Headers.REPLY_TO] = props.reply_to
    key = table.get(H_KEY)
    return Message(
        subject,
        delivered.body,
        key=key if isinstance(key, str) else None,
        headers=headers,
        id=props.message_id or None,
        timestamp=timestamp_of(table),
        stream=stream,
        partition=partition,
        offset=offset,
    )


def partition_of(delivered: DeliveredMessage) -> int:
    """The partition of a stored message: a header on copies, else the routing key's first word."""
    table = delivered.header.properties.headers or {}
    value = table.get(H_PARTITION)
    if isinstance(value, int):
        return value
    word = (delivered.routing_key or "").partition(".")[0]
    return int(word) if word.isdigit() else 0


def int_header(delivered: DeliveredMessage, name: str, default: int) -> int:
    table = delivered.header.properties.headers or {}
    value = table.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def failures_of(delivered: DeliveredMessage) -> Failures:
    """The failures a message met before it was copied for a retry (kept in its headers)."""
    table = delivered.header.properties.headers or {}
    failures = Failures()
    first, last = table.get(H_FIRST_FAILURE), table.get(H_LAST_FAILURE)
    if isinstance(first, int):
        failures.first_at = first / 1_000_000
    if isinstance(last, int):
        failures.last_at = last / 1_000_000
    error_type, error_message = table.get(H_ERROR_TYPE), table.get(H_ERROR_MESSAGE)
    if isinstance(error_type, str):
        failures.error_type = error_type
    if isinstance(error_message, str):
        failures.error_message = error_message
    return failures


def failure_headers(failures: Failures) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if failures.first_at:
        out[H_FIRST_FAILURE] = int(failures.first_at * 1_000_000)
    if failures.last_at:
        out[H_LAST_FAILURE] = int(failures.last_at * 1_000_000)
    if failures.error_type:
        out[H_ERROR_TYPE] = failures.error_type
        out[H_ERROR_MESSAGE] = failures.error_message
    return out


def copy_properties(
    delivered: DeliveredMessage, extra: Mapping[str, Any], *, expiration: str | None = None
) -> Basic.Properties:
    """The properties of a copy of a stored message (a retry, a backfill): its id, key,
    timestamp and headers, plus ``extra``; what RabbitMQ added on the way is dropped."""
    props = delivered.header.properties
    table = {
        name: value
        for name, value in (props.headers or {}).items()
        if not name.startswith(("x-death", "x-first-death-", "x-last-death-", "x-delivery-count"))
        and name not in ("x-stream-offset", "x-received-from")
    }
    table.update(extra)
    return Basic.Properties(
        delivery_mode=PERSISTENT, message_id=props.message_id, headers=table, expiration=expiration
    )
