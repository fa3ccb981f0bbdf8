"""The ``$PIGEON.API`` wire format, shared by ``pigeon serve`` and the ``nats://`` transport.

Requests and most replies are JSON. Messages travel as *records*, several in one NATS
payload: per record a 4-byte big-endian length and a compact JSON object of its metadata,
then a 4-byte length and the payload bytes. Errors are ``{"error": {"type", "description"}}``
with the name of a `pigeon.errors` class, so the client raises the same exception the engine
raised. docs/pigeon-api.md describes every request.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

from . import errors
from .engine.config import StartAt
from .engine.groups.config import Backoff
from .engine.groups.lag import PartitionLag
from .message import Message

__all__ = [
    "API",
    "CAPABILITIES",
    "KEY_HEADER",
    "MSG_ID_HEADER",
    "PROTOCOL_VERSION",
    "REQUEST_FIELDS",
    "SPEC_FIELDS",
    "SUBJECT_HEADER",
    "Record",
    "backoff_from_json",
    "backoff_to_json",
    "check_fields",
    "decode",
    "decode_records",
    "encode",
    "encode_records",
    "error_from_json",
    "error_to_json",
    "from_header_value",
    "lag_from_json",
    "lag_to_json",
    "start_from_json",
    "start_to_json",
    "to_header_value",
]

API = "$PIGEON.API."
PROTOCOL_VERSION = 1
_LENGTH = struct.Struct(">I")

# What the engine does natively that JetStream's API has no name for; INFO lists them.
CAPABILITIES = (
    "partitions",
    "keyed_publish",
    "batch_publish",
    "ordered_groups",
    "shared_groups",
    "key_ordered",
    "dead_letters",
    "lag",
    "dedup",
)

# A one-message PUB names its subject (and key and id) in headers, the payload being the message.
SUBJECT_HEADER = "Pigeon-Subject"
KEY_HEADER = "Pigeon-Key"
MSG_ID_HEADER = "Nats-Msg-Id"

# The fields each JSON request may carry: anything else is a client mistake worth naming.
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "INFO": frozenset(),
    "STREAM.CREATE": frozenset(
        {"name", "subjects", "partitions", "max_age_s", "max_msgs", "max_bytes", "dedup_window_s"}
    ),
    "STREAM.DELETE": frozenset({"name"}),
    "STREAM.STATE": frozenset({"name"}),
    "STREAM.LIST": frozenset(),
    "STREAM.PURGE": frozenset({"name"}),
    "GROUP.JOIN": frozenset({"stream", "spec", "member"}),
    "GROUP.LEAVE": frozenset({"member"}),
    "GROUP.FETCH": frozenset({"member", "batch", "expires_s"}),
    "GROUP.DELETE": frozenset({"stream", "group"}),
    "GROUP.LAG": frozenset({"stream", "group"}),
    "GROUP.DEAD_LETTERS": frozenset({"stream", "group", "max"}),
    "ACK": frozenset({"member", "partition", "offset", "op", "delay", "error"}),
}
SPEC_FIELDS = frozenset(
    {
        "group",
        "kind",
        "start",
        "ack_wait_s",
        "max_deliver",
        "backoff",
        "max_ack_pending",
        "key_ordered",
        "dead_letter",
    }
)


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def decode(payload: bytes) -> dict[str, Any]:
    """A request or reply body; `InvalidMessageError` when it is not a JSON object."""
    try:
        body = json.loads(payload) if payload.strip() else {}
    except ValueError as error:
        raise errors.InvalidMessageError(f"not JSON: {error}") from None
    if not isinstance(body, dict):
        raise errors.InvalidMessageError("expected a JSON object")
    return body


def check_fields(body: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    """`InvalidMessageError` naming the fields of ``body`` that ``what`` does not take."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise errors.InvalidMessageError(f"{what}: unknown fields {unknown}; it takes {sorted(allowed)}")


# -- header values ------------------------------------------------------------------------------

# nats-py trims header values and turns CR/LF into spaces. Values that would not survive that
# travel base64-encoded behind this marker (as do values that start with it).
ENCODED_MARK = "=?b64?"


def to_header_value(value: object, what: str) -> str:
    """``value`` as a NATS header value that reads back the same with `from_header_value`."""
    if not isinstance(value, str):
        raise errors.InvalidMessageError(f"{what} must be text, not {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates
            raise errors.InvalidMessageError(f"{what} is not valid text: {value!r}") from None
    if value and (value != value.strip() or "\r" in value or "\n" in value or value.startswith(ENCODED_MARK)):
        return ENCODED_MARK + base64.b64encode(value.encode()).decode()
    return value


def from_header_value(value: str) -> str:
    if value.startswith(ENCODED_MARK):
        try:
            return base64.b64decode(value[len(ENCODED_MARK) :], validate=True).decode()
        except ValueError:
            return value  # not ours: someone else's value that merely looks encoded
    return value


# -- records ----------------------------------------------------------------------------------


class Record:
    """A message with where it is stored and, for a group member, its delivery count."""

    __slots__ = ("delivery_count", "message")

    def __init__(self, message: Message, delivery_count: int = 0) -> None:
        self.message = message
        self.delivery_count = delivery_count


def encode_records(records: Sequence[Record]) -> bytes:
    out = bytearray()
    for record in records:
        m = record.message
        meta: dict[str, Any] = {"s": m.subject, "t": m.timestamp}
        # A publish names an id only when its publisher chose one (it is then deduplicated).
        if m.stream is not None or m.has_explicit_id:
            meta["i"] = m.id
        if m.key is not None:
            meta["k"] = m.key
        if m.headers:
            meta["h"] = m.headers
        if m.stream is not None:
            meta["st"], meta["p"], meta["o"] = m.stream, m.partition, m.offset
        if record.delivery_count:
            meta["d"] = record.delivery_count
        encoded = json.dumps(meta, separators=(",", ":")).encode()
        out += _LENGTH.pack(len(encoded)) + encoded + _LENGTH.pack(len(m.payload)) + m.payload
    return bytes(out)


def decode_records(data: bytes) -> list[Record]:
    return list(_records(memoryview(data)))


def _records(data: memoryview) -> Iterator[Record]:
    at = 0
    try:
        while at < len(data):
            (size,) = _LENGTH.unpack_from(data, at)
            meta = json.loads(bytes(data[at + 4 : at + 4 + size]))
            at += 4 + size
            (size,) = _LENGTH.unpack_from(data, at)
            payload = bytes(data[at + 4 : at + 4 + size])
            if len(payload) != size:
                raise ValueError("truncated payload")
            at += 4 + size
            message = Message(
                meta["s"],
                payload,
                key=meta.get("k"),
                headers=meta.get("h"),
                id=meta.get("i"),
                timestamp=meta["t"],
                stream=meta.get("st"),
                partition=meta.get("p"),
                offset=meta.get("o"),
            )
            yield Record(message, meta.get("d", 0))
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise errors.InvalidMessageError(f"malformed records: {error!r}") from None


# -- configuration values -----------------------------------------------------------------------


def start_to_json(start: StartAt) -> dict[str, Any]:
    return {"kind": start.kind, "value": start.value}


def start_from_json(data: Any) -> StartAt:
    if data is None:
        return StartAt.earliest()
    if not isinstance(data, dict):
        raise errors.InvalidConfigError(f"start must be an object, not {data!r}")
    kind = data.get("kind")
    if kind in ("earliest", "latest"):
        return StartAt(kind)
    if kind == "offset":
        return StartAt.offset(data.get("value"))  # type: ignore[arg-type]
    if kind == "time":
        return StartAt.time(data.get("value"))  # type: ignore[arg-type]
    raise errors.InvalidConfigError(f"unknown start kind {kind!r}")


def backoff_to_json(backoff: Backoff | None) -> dict[str, Any] | None:
    return None if backoff is None else asdict(backoff)


def backoff_from_json(data: Any) -> Backoff | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise errors.InvalidConfigError(f"backoff must be an object, not {data!r}")
    try:
        return Backoff(**data)
    except TypeError as error:
        raise errors.InvalidConfigError(f"backoff: {error}") from None


def lag_to_json(lag: PartitionLag) -> dict[str, Any]:
    return asdict(lag)


def lag_from_json(data: dict[str, Any]) -> PartitionLag:
    return PartitionLag(**data)


# -- errors -------------------------------------------------------------------------------------

# Extra constructor arguments of the error classes that take them.
_FIELDS = {
    "ConcurrencyConflictError": ("expected", "actual"),
    "DataDirLockedError": ("pid",),
    "CorruptLogError": ("path", "position"),
    "ClaimInProgressError": ("retry_after",),
}


def error_to_json(error: BaseException) -> dict[str, Any]:
    name = type(error).__name__ if isinstance(error, errors.PigeonError) else "PigeonError"
    body: dict[str, Any] = {"type": name, "description": str(error)}
    for field in _FIELDS.get(name, ()):
        body[field] = getattr(error, field, None)
    if isinstance(error, errors.UnsupportedFeatureError):
        body.update(backend=error.backend, feature=error.feature, alternative=error.alternative)
    return {"error": body}


def error_from_json(body: dict[str, Any]) -> errors.PigeonError:
    description = str(body.get("description", "pigeon serve reported an error"))
    cls = getattr(errors, str(body.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.PigeonError)):
        return errors.PigeonError(description)
    if cls.__name__ in _FIELDS:
        return cls(description, **{f: body.get(f) for f in _FIELDS[cls.__name__]})
    if cls is errors.UnsupportedFeatureError:
        return cls(str(body.get("backend")), str(body.get("feature")), str(body.get("alternative")))
    return cls(description)
