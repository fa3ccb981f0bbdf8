"""How messages look in PostgreSQL: rows of the messages table, and core frames in NOTIFYs.

A core frame is JSON text (a NOTIFY payload must be text): subject ``s``, payload ``p``
(base64), timestamp ``t``, and when present headers ``h``, key ``k``, the publisher's id
``i``, the reply subject ``r`` and ``q``, the queue-group members the publisher picked.
A frame longer than a NOTIFY can carry is stored in the blobs table and the NOTIFY carries
``s``, ``q`` and the blob's id ``b`` instead.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ...errors import InvalidMessageError, MessageTooLargeError
from ...message import Headers, Message

_COMPACT = (",", ":")
# PostgreSQL refuses payloads of 8000 bytes or more; leave room for the blob reference form.
NOTIFY_LIMIT = 7900


def _check_text(what: str, value: str) -> None:
    # PostgreSQL text holds neither NUL nor unpaired surrogates; refuse them here rather than
    # letting the driver fail with its own exception.
    if "\x00" in value:
        raise InvalidMessageError(f"{what} {value!r}: PostgreSQL text cannot hold NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidMessageError(f"{what} {value!r} is not valid Unicode text") from None


def check_message(
    payload: object, key: object, headers: object, msg_id: object, max_bytes: int
) -> dict[str, str] | None:
    """Refuse malformed fields with pigeon's errors; returns the headers as a dict (or None)."""
    if not isinstance(payload, bytes):
        raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise MessageTooLargeError(f"payload of {len(payload)} bytes exceeds max_message_bytes ({max_bytes})")
    if key is not None:
        if not isinstance(key, str):
            raise InvalidMessageError(f"key must be text, not {type(key).__name__}")
        _check_text("key", key)
    if msg_id is not None:
        if not isinstance(msg_id, str) or not msg_id:
            raise InvalidMessageError(f"message id must be non-empty text, not {msg_id!r}")
        _check_text("message id", msg_id)
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(f"headers must be a mapping of text to text, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise InvalidMessageError(f"headers must map non-empty text to text, not {name!r}: {value!r}")
        _check_text("header name", name)
        _check_text(f"header {name!r}", value)
    return dict(headers) if headers else None


@dataclass
class Outgoing:
    """One message on its way out: to the stream capturing its subject, and to core subscribers."""

    subject: str
    payload: bytes
    key: str | None = None
    headers: dict[str, str] | None = None
    msg_id: str | None = None  # chosen by the publisher: used for dedup
    reply_to: str | None = None
    timestamp: float = field(default_factory=time.time)


MESSAGE_COLUMNS = 'partition, "offset", subject, key, payload, headers, msg_id, explicit_id, created_at'


def row_message(stream: str, row: asyncpg.Record) -> Message:
    headers = row["headers"]
    explicit = row["explicit_id"]
    message = Message(
        row["subject"],
        row["payload"],
        key=row["key"],
        headers=json.loads(headers) if headers else None,
        id=row["msg_id"] if explicit else None,
        timestamp=row["created_at"].timestamp(),
        stream=stream,
        partition=row["partition"],
        offset=row["offset"],
    )
    if not explicit:
        # Generated ids are not the publisher's: keep has_explicit_id False, as the engine does.
        message._id_number = uuid.UUID(row["msg_id"]).int
    return message


def headers_json(headers: Mapping[str, str] | None) -> str | None:
    return json.dumps(headers, separators=_COMPACT) if headers else None


def core_frame(item: Outgoing, targets: list[str]) -> str:
    head: dict[str, Any] = {
        "s": item.subject,
        "p": base64.b64encode(item.payload).decode(),
        "t": item.timestamp,
    }
    if item.headers:
        head["h"] = item.headers
    if item.key is not None:
        head["k"] = item.key
    if item.msg_id is not None:
        head["i"] = item.msg_id
    if item.reply_to is not None:
        head["r"] = item.reply_to
    if targets:
        head["q"] = targets
    return json.dumps(head, separators=_COMPACT)


def blob_reference(subject: str, blob_id: str, targets: list[str]) -> str:
    head: dict[str, Any] = {"s": subject, "b": blob_id}
    if targets:
        head["q"] = targets
    return json.dumps(head, separators=_COMPACT)


@dataclass
class Frame:
    subject: str
    targets: list[str]
    blob: str | None
    head: dict[str, Any]


def parse_frame(text: str | bytes) -> Frame | None:
    """The routing part of a frame, or None for something that is not one (ignored)."""
    try:
        head = json.loads(text)
        subject = head["s"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(subject, str):
        return None
    return Frame(subject, list(head.get("q") or ()), head.get("b"), head)


def frame_message(head: Mapping[str, Any]) -> Message:
    headers: dict[str, str] = dict(head.get("h") or {})
    reply_to = head.get("r")
    if reply_to is not None:
        headers[Headers.REPLY_TO] = reply_to
    return Message(
        head["s"],
        base64.b64decode(head.get("p") or ""),
        key=head.get("k"),
        headers=headers or None,
        id=head.get("i"),
        timestamp=head.get("t"),
    )
