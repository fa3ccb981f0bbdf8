"""The NATS client protocol, client to server direction: an incremental parser with no I/O.

:class:`Parser` turns bytes, split anywhere, into operations (:class:`Connect`, :class:`Pub`,
:class:`Sub`, :class:`Unsub`, :class:`Ping`, :class:`Pong`). It works on whole chunks: control
lines are found with ``bytes.find`` and payloads are sliced, never walked byte by byte.

Control lines end in ``\\n`` with an optional ``\\r`` before it and their words are separated
by any run of spaces or tabs, as nats-server accepts. A payload must be followed by exactly
``\\r\\n``. Verbs are case-insensitive.

Errors are :class:`ProtocolError`, whose text is what the server sends in ``-ERR '...'``
before closing the connection.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from ...errors import PigeonError

__all__ = [
    "ERR_AUTHORIZATION",
    "ERR_AUTH_TIMEOUT",
    "ERR_CONTROL_LINE",
    "ERR_INVALID_PUBLISH_SUBJECT",
    "ERR_INVALID_SUBJECT",
    "ERR_MAX_PAYLOAD",
    "ERR_PARSER",
    "ERR_SLOW_CONSUMER",
    "ERR_STALE",
    "ERR_UNKNOWN_OP",
    "HEADER_LINE",
    "Connect",
    "Op",
    "Parser",
    "Ping",
    "Pong",
    "ProtocolError",
    "Pub",
    "Sub",
    "Unsub",
    "parse_headers",
]

# The texts nats-server sends, so that clients which match on them behave the same.
ERR_UNKNOWN_OP = "Unknown Protocol Operation"
ERR_MAX_PAYLOAD = "Maximum Payload Violation"
ERR_CONTROL_LINE = "Maximum Control Line Exceeded"
ERR_INVALID_SUBJECT = "Invalid Subject"
ERR_INVALID_PUBLISH_SUBJECT = "Invalid Publish Subject"
ERR_AUTHORIZATION = "Authorization Violation"
ERR_AUTH_TIMEOUT = "Authentication Timeout"
ERR_SLOW_CONSUMER = "Slow Consumer"
ERR_STALE = "Stale Connection"
# nats-server closes silently on malformed arguments; pigeon says why.
ERR_PARSER = "Parser Error"

HEADER_LINE = b"NATS/1.0"


class ProtocolError(PigeonError):
    """The client broke the protocol; ``ops`` are the operations parsed before the fault."""

    def __init__(self, text: str, ops: list[Op] | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.ops: list[Op] = ops if ops is not None else []


class Connect(NamedTuple):
    options: dict[str, Any]


class Pub(NamedTuple):
    """PUB or HPUB. ``data`` is the header block (``header_size`` bytes; 0 for PUB) then the payload."""

    subject: bytes
    reply: bytes
    header_size: int
    data: bytes


class Sub(NamedTuple):
    subject: bytes
    queue: bytes
    sid: bytes


class Unsub(NamedTuple):
    sid: bytes
    max_msgs: int | None


class Ping(NamedTuple):
    pass


class Pong(NamedTuple):
    pass


Op = Connect | Pub | Sub | Unsub | Ping | Pong

_PING = Ping()
_PONG = Pong()
_CRLF = b"\r\n"
_SPACE_TAB = b" \t"
# A PUB control line in the form clients write (spaces between words, CRLF): one
# C-level match instead of the general path's slicing and splitting, for the most common op.
_PLAIN_PUB = re.compile(rb"PUB +(\S+) +(?:(\S+) +)?([0-9]{1,10})\r\n")


def _size(word: bytes) -> int:
    # int() would accept '+5', ' 5', '5_0' and non-ASCII digits; the protocol allows digits only.
    if not word.isdigit() or len(word) > 10:
        raise ProtocolError(ERR_PARSER)
    return int(word)


def _words(rest: bytes) -> list[bytes]:
    # Also splits on \v and \f, which nats-server keeps inside a word; a subject holding one
    # is invalid either way.
    return rest.split()


class Parser:
    """Feed bytes in, get operations out. Not reusable after a :class:`ProtocolError`."""

    def __init__(self, max_payload: int, max_control_line: int = 4096) -> None:
        self.max_payload = max_payload
        self.max_control_line = max_control_line
        self._chunks: list[bytes] = []
        self._have = 0
        # Bytes needed before parsing can progress: a whole payload, or any more for a line.
        self._need = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of an operation."""
        return self._have

    def feed(self, data: bytes) -> list[Op]:
        if self._failed:
            raise ProtocolError(ERR_PARSER)
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        ops: list[Op] = []
        try:
            pos = self._parse(data, ops)
        except ProtocolError as error:
            self._failed = True
            error.ops = ops
            raise
        if pos < len(data):
            rest = data[pos:]
            self._chunks.append(rest)
            self._have = len(rest)
        return ops

    def _parse(self, buf: bytes, ops: list[Op]) -> int:
        pos = 0
        end = len(buf)
        max_payload = self.max_payload
        max_line = self.max_control_line
        plain_pub = _PLAIN_PUB.match
        append = ops.append
        while pos < end:
            found = plain_pub(buf, pos)
            if found is not None:
                start = found.end()
                if start - pos <= max_line:
                    subject, reply, tsize = found.groups()
                    stop = start + int(tsize)
                    if stop - start > max_payload:
                        raise ProtocolError(ERR_MAX_PAYLOAD)
                    if stop + 2 > end:
                        self._need = stop + 2 - pos
                        return pos
                    if not buf.startswith(_CRLF, stop):
                        raise ProtocolError(ERR_UNKNOWN_OP)
                    append(Pub(subject, reply or b"", 0, buf[start:stop]))
                    pos = stop + 2
                    continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if end - pos > self.max_control_line:
                    raise ProtocolError(ERR_CONTROL_LINE)
                self._need = end - pos + 1
                return pos
            if nl - pos > self.max_control_line:
                raise ProtocolError(ERR_CONTROL_LINE)
            line_end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
            line = buf[pos:line_end]
            head = line[:6].upper()
            if head[:4] == b"PUB " or head[:4] == b"PUB\t" or head[:5] in (b"HPUB ", b"HPUB\t"):
                headers = head[0] == 72  # 'H'
                args = _words(line[5 if headers else 4 :])
                if headers:
                    if len(args) == 3:
                        subject, hsize, tsize = args
                        reply = b""
                    elif len(args) == 4:
                        subject, reply, hsize, tsize = args
                    else:
                        raise ProtocolError(ERR_PARSER)
                    header_size = _size(hsize)
                    size = _size(tsize)
                    if header_size > size or header_size < len(HEADER_LINE) + 4:
                        raise ProtocolError(ERR_PARSER)
                else:
                    if len(args) == 2:
                        subject, tsize = args
                        reply = b""
                    elif len(args) == 3:
                        subject, reply, tsize = args
                    else:
                        raise ProtocolError(ERR_PARSER)
                    header_size = 0
                    size = _size(tsize)
                if size > max_payload:
                    raise ProtocolError(ERR_MAX_PAYLOAD)
                start = nl + 1
                stop = start + size
                if stop + 2 > end:
                    # Parse the control line again when the payload is complete: cheap, and
                    # it keeps the parser's state down to "bytes not yet consumed".
                    self._need = stop + 2 - pos
                    return pos
                if buf[stop : stop + 2] != _CRLF:
                    raise ProtocolError(ERR_UNKNOWN_OP)
                data = buf[start:stop]
                if header_size and not data.startswith(HEADER_LINE):
                    raise ProtocolError(ERR_PARSER)
                ops.append(Pub(subject, reply, header_size, data))
                pos = stop + 2
                continue
            pos = nl + 1
            if head[:4] == b"SUB " or head[:4] == b"SUB\t":
                args = _words(line[4:])
                if len(args) == 2:
                    ops.append(Sub(args[0], b"", args[1]))
                elif len(args) == 3:
                    ops.append(Sub(args[0], args[1], args[2]))
                else:
                    raise ProtocolError(ERR_PARSER)
            elif head[:4] == b"PING" and not line[4:].strip(_SPACE_TAB):
                ops.append(_PING)
            elif head[:4] == b"PONG" and not line[4:].strip(_SPACE_TAB):
                ops.append(_PONG)
            elif head == b"UNSUB " or head == b"UNSUB\t":
                args = _words(line[6:])
                if len(args) == 1:
                    ops.append(Unsub(args[0], None))
                elif len(args) == 2:
                    ops.append(Unsub(args[0], _size(args[1])))
                else:
                    raise ProtocolError(ERR_PARSER)
            elif head[:5] == b"CONNE" and line[:8].upper() in (b"CONNECT ", b"CONNECT\t"):
                try:
                    options = json.loads(line[8:])
                except ValueError:
                    raise ProtocolError(ERR_PARSER) from None
                if not isinstance(options, dict):
                    raise ProtocolError(ERR_PARSER)
                ops.append(Connect(options))
            else:
                raise ProtocolError(ERR_UNKNOWN_OP)
        return pos


def parse_headers(block: bytes) -> tuple[int | None, str, list[tuple[str, str]]]:
    """Split a header block (``NATS/1.0 [status [description]]`` then ``Name: value`` lines).

    Returns the status code (None when absent), the description and the (name, value) pairs
    in order, repeats kept. Lines without a colon are skipped, as the NATS clients do.
    """
    text = block.decode("utf-8", errors="replace")
    lines = text.split("\r\n")
    first = lines[0][len("NATS/1.0") :].strip()
    code_text, _, description = first.partition(" ")
    status = int(code_text) if code_text.isdigit() else None
    pairs: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name:
            pairs.append((name.strip(), value.strip()))
    return status, description.strip(), pairs
