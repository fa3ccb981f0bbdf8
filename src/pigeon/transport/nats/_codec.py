"""Messages on the wire: headers, keys and ids as NATS headers, JetStream delivery metadata, errors."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import nats.errors
from nats.js.errors import APIError, ServiceUnavailableError

from ...errors import (
    GroupNotFoundError,
    InvalidMessageError,
    MessageTooLargeError,
    PigeonError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    SubjectOverlapError,
    TransportClosedError,
    UnsupportedFeatureError,
)
from ...message import Headers, Message
from ...wire import from_header_value as _read_value
from ...wire import to_header_value as _wire_value

NATS_MSG_ID = "Nats-Msg-Id"
KEY_HEADER = "Pigeon-Key"
# Headers pigeon puts on the wire for itself; they become Message fields on receipt.
_OWN_HEADERS = frozenset({NATS_MSG_ID, KEY_HEADER, Headers.MSG_ID})

# NATS header names are RFC 7230 tokens; nats-py refuses anything else.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def wire_headers(
    headers: Mapping[str, str] | None, key: str | None, msg_id: str | None, generated_id: str | None
) -> dict[str, str] | None:
    """The NATS headers of a message; None when it has none (a plain NATS message)."""
    if headers is None and key is None and msg_id is None and generated_id is None:
        return None
    out: dict[str, str] = {}
    if headers:
        if not isinstance(headers, Mapping):
            raise InvalidMessageError(
                f"headers must be a mapping of text to text, not {type(headers).__name__}"
            )
        for name, value in headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise InvalidMessageError(
                    f"header name {name!r} cannot travel on NATS: use letters, digits and !#$%&'*+-.^_`|~"
                )
            out[name] = _wire_value(value, f"header {name!r}")
    if key is not None:
        out[KEY_HEADER] = _wire_value(key, "message key")
    if msg_id is not None:
        if not isinstance(msg_id, str) or not msg_id:
            raise InvalidMessageError(f"message id must be non-empty text, not {msg_id!r}")
        out[NATS_MSG_ID] = _wire_value(msg_id, "message id")
    elif generated_id is not None:
        out[Headers.MSG_ID] = generated_id
    return out


def read_message(
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None,
    *,
    timestamp: float | None = None,
    stream: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> Message:
    """A `Message` from what NATS delivered; pigeon's own headers become its key and id."""
    key = msg_id = None
    out: dict[str, str] | None = None
    if headers:
        out = {}
        for name, value in headers.items():
            if name in _OWN_HEADERS:
                if name == KEY_HEADER:
                    key = _read_value(value)
                elif name == NATS_MSG_ID or msg_id is None:
                    msg_id = _read_value(value)
            else:
                out[name] = _read_value(value)
    return Message(
        subject,
        payload,
        key=key,
        headers=out,
        id=msg_id,
        timestamp=timestamp,
        stream=stream,
        partition=partition,
        offset=offset,
    )


class Delivered(NamedTuple):
    """What a JetStream delivery's reply subject (``$JS.ACK...``) tells."""

    stream: str
    delivered: int
    stream_seq: int
    timestamp: float


def parse_ack_subject(reply: str) -> Delivered | None:
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        base = 2
    elif len(tokens) >= 11:  # with domain and account hash: $JS.ACK.<domain>.<hash>.<stream>...
        base = 4
    else:
        return None
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    try:
        return Delivered(
            tokens[base],
            int(tokens[base + 2]),
            int(tokens[base + 3]),
            int(tokens[base + 5]) / 1e9,
        )
    except ValueError:
        return None


# JetStream error codes pigeon turns into its own exceptions.
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
STREAM_NAME_IN_USE = 10058
SUBJECTS_OVERLAP = 10065
SEALED = 10109
_FULL = {10077, 10078, 10047, 10048}  # maximum messages / bytes exceeded, storage limits
_TOO_LARGE = {10054}


def api_error(error: APIError, what: str) -> PigeonError:
    """The pigeon exception for a JetStream API error about ``what``."""
    code = error.err_code
    text = f"{what}: {error.description}"
    if code == STREAM_NOT_FOUND:
        return StreamNotFoundError(text)
    if code == CONSUMER_NOT_FOUND:
        return GroupNotFoundError(text)
    if code == STREAM_NAME_IN_USE:
        return StreamExistsError(text)
    if code == SUBJECTS_OVERLAP:
        return SubjectOverlapError(text)
    if code in _FULL:
        return StreamFullError(text)
    if code in _TOO_LARGE:
        return MessageTooLargeError(text)
    return PigeonError(f"{text} (JetStream error {code})")


@contextlib.contextmanager
def jetstream_errors(what: str) -> Iterator[None]:
    """Turn the client's exceptions about ``what`` into pigeon's."""
    try:
        yield
    except ServiceUnavailableError:
        raise UnsupportedFeatureError(
            "nats", f"{what} without JetStream", "start nats-server with JetStream enabled (-js)"
        ) from None
    except APIError as error:
        raise api_error(error, what) from None
    except nats.errors.ConnectionClosedError:
        raise TransportClosedError(f"{what}: the NATS connection is closed") from None
