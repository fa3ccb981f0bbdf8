"""How messages look in Redis: core frames on pub/sub channels, fields of stream entries.

A core frame is ``P1`` + a JSON head (subject, headers, key, id, reply subject, timestamp)
+ a newline + the payload bytes; JSON escapes newlines, so the first one ends the head.

A stream entry has the fields ``o`` (the dense pigeon offset), ``s`` (subject), ``p``
(payload), and when present ``k`` (key), ``h`` (headers, JSON), ``i`` (an id the publisher
chose, used for dedup) or ``g`` (an id pigeon generated). The timestamp is the entry id's
milliseconds: the Redis server's clock, the same one `StartAt.time` is resolved against.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ...engine.groups.deadletter import Failures
from ...errors import InvalidMessageError
from ...message import Headers, Message

_FRAME_MAGIC = b"P1"
_COMPACT = (",", ":")


def check_message(payload: object, key: object, headers: object, msg_id: object) -> dict[str, str] | None:
    """Refuse malformed fields with pigeon's error (never a client library's)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidMessageError(f"payload must be bytes, not {type(payload).__name__}")
    if key is not None and not isinstance(key, str):
        raise InvalidMessageError(f"key must be text, not {type(key).__name__}")
    if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
        raise InvalidMessageError(f"message id must be non-empty text, not {msg_id!r}")
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(f"headers must be a mapping of text to text, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidMessageError(f"headers must map text to text, not {name!r}: {value!r}")
    return dict(headers) if headers else None


def frame_head(
    subject: str,
    headers: Mapping[str, str] | None,
    key: str | None,
    msg_id: str | None,
    reply_to: str | None,
) -> bytes:
    head: dict[str, Any] = {"s": subject, "t": time.time()}
    if headers:
        head["h"] = headers
    if key is not None:
        head["k"] = key
    if msg_id is not None:
        head["i"] = msg_id
    if reply_to is not None:
        head["r"] = reply_to
    return _FRAME_MAGIC + json.dumps(head, separators=_COMPACT).encode() + b"\n"


def decode_frame(data: bytes) -> Message | None:
    """The core message in a frame, or None for something that is not one (ignored)."""
    if not data.startswith(_FRAME_MAGIC):
        return None
    end = data.find(b"\n", len(_FRAME_MAGIC))
    if end < 0:
        return None
    try:
        head = json.loads(data[len(_FRAME_MAGIC) : end])
    except ValueError:
        return None
    headers: dict[str, str] = dict(head.get("h") or {})
    reply_to = head.get("r")
    if reply_to is not None:
        headers[Headers.REPLY_TO] = reply_to
    return Message(
        head["s"],
        data[end + 1 :],
        key=head.get("k"),
        headers=headers or None,
        id=head.get("i"),
        timestamp=head.get("t"),
    )


def entry_fields(
    key: str | None, headers: Mapping[str, str] | None, msg_id: str | None, generated_id: str | None
) -> list[str | bytes]:
    """The optional fields of a stream entry (the script adds offset, subject and payload)."""
    fields: list[str | bytes] = []
    if key is not None:
        fields += ["k", key]
    if headers:
        fields += ["h", json.dumps(headers, separators=_COMPACT)]
    if msg_id is not None:
        fields += ["i", msg_id]
    elif generated_id is not None:
        fields += ["g", generated_id]
    return fields


def entry_message(
    stream: str, partition: int, entry_id: bytes, fields: Sequence[bytes] | Mapping[bytes, bytes]
) -> Message:
    """The message stored in a stream entry (fields as a flat list from a script, or a dict)."""
    values: Mapping[bytes, bytes]
    if isinstance(fields, Mapping):
        values = fields
    else:
        values = {fields[i]: fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    raw_headers = values.get(b"h")
    key = values.get(b"k")
    chosen = values.get(b"i")
    message = Message(
        values[b"s"].decode(),
        bytes(values.get(b"p", b"")),
        key=None if key is None else key.decode(),
        headers=None if raw_headers is None else json.loads(raw_headers),
        id=None if chosen is None else chosen.decode(),
        timestamp=int(entry_id.split(b"-", 1)[0]) / 1000,
        stream=stream,
        partition=partition,
        offset=int(values[b"o"]),
    )
    generated = values.get(b"g")
    if generated is not None:
        # Generated ids are not the publisher's: keep has_explicit_id False, as the engine does.
        message._id_number = uuid.UUID(generated.decode()).int
    return message


def failure_args(error: BaseException | str | None) -> list[str]:
    """``has error, type, text`` as a script expects them (as `Failures.note` reads an error)."""
    if isinstance(error, BaseException):
        return ["1", type(error).__name__, str(error)]
    if error is not None:
        return ["1", "Error", str(error)]
    return ["0", "", ""]


def failures_from(record: bytes | str | None) -> Failures:
    if not record:
        return Failures()
    data = json.loads(record)
    return Failures(
        first_at=float(data.get("f") or 0),
        last_at=float(data.get("l") or 0),
        error_type=data.get("t") or "",
        error_message=data.get("m") or "",
    )
