"""The on-disk record batch: how messages become bytes and back.

A batch is the unit of writing, checksumming and atomicity. Layout (little-endian)::

    magic u8 | attributes u8 | length u32 | crc32c u32 |
    base_offset u64 | count u32 | timestamp_ns i64 | base_id u128 (as two u64) |
    record * count

``length`` counts the whole batch; the CRC32C covers the attributes byte and every byte
after the crc field, so a torn or flipped batch never decodes. Every record of a batch
shares its timestamp (the append time, in whole microseconds) and derives its offset and
generated id from the batch's base plus its index.
A record is::

    length u32 (bytes after this field) | flags u8 | subject_len u16 | subject |
    [id_len u8 | id]           if flags & EXPLICIT_ID
    [key_len u16 | key]        if flags & KEY
    [headers_len u32 | headers] if flags & HEADERS  (count u16, then k_len u16 k v_len u32 v)
    payload                     the rest
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from crc32c import crc32c

from ..errors import InvalidMessageError
from ..message import Message

MAGIC = 0xB1
HEADER = struct.Struct("<BBIIQIqQQ")
HEADER_SIZE = HEADER.size
_CRC_START = 10  # magic, attributes, length and crc themselves are not covered
_BEFORE_CRC = struct.Struct("<BBII")  # magic, attributes, length, crc
_AFTER_CRC = struct.Struct("<QIqQQ")  # base offset, count, timestamp, base id (high, low)

_RECORD = struct.Struct("<IBH")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEADER_PAIR = struct.Struct("<H")

EXPLICIT_ID = 1
KEY = 2
HEADERS = 4

# Batch attribute: every record has the same subject and no optional field (bulk publishes),
# so reading can skip per-record subject and flag handling.
UNIFORM = 1

# The CRC starts from the attributes byte (so a flipped attribute is caught) and continues
# over the rest: precomputed starting values avoid concatenating the batch.
_ATTRIBUTE_CRC = [crc32c(bytes([value])) for value in range(256)]

MAX_ID_BYTES = 255
MAX_KEY_BYTES = 0xFFFF

_subject_bytes: dict[str, bytes] = {}
_subject_text: dict[bytes, str] = {}
_CACHE_LIMIT = 65536


def _encode_subject(subject: str) -> bytes:
    encoded = _subject_bytes.get(subject)
    if encoded is None:
        if len(_subject_bytes) >= _CACHE_LIMIT:
            _subject_bytes.clear()
        encoded = _subject_bytes[subject] = subject.encode()
    return encoded


def _decode_subject(raw: bytes) -> str:
    text = _subject_text.get(raw)
    if text is None:
        if len(_subject_text) >= _CACHE_LIMIT:
            _subject_text.clear()
        text = _subject_text[raw] = raw.decode()
    return text


def encode_headers(headers: dict[str, str]) -> bytes:
    parts = [_U16.pack(len(headers))]
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidMessageError(f"header {name!r}: names and values must be text")
        name_bytes, value_bytes = name.encode(), value.encode()
        if not name_bytes or len(name_bytes) > 0xFFFF:
            raise InvalidMessageError(f"header name {name!r} must be 1 to 65535 bytes")
        parts += (_U16.pack(len(name_bytes)), name_bytes, _U32.pack(len(value_bytes)), value_bytes)
    return b"".join(parts)


def decode_headers(raw: bytes) -> dict[str, str]:
    (count,) = _U16.unpack_from(raw, 0)
    pos = 2
    headers = {}
    for _ in range(count):
        (name_len,) = _U16.unpack_from(raw, pos)
        pos += 2
        name = raw[pos : pos + name_len].decode()
        pos += name_len
        (value_len,) = _U32.unpack_from(raw, pos)
        pos += 4
        headers[name] = raw[pos : pos + value_len].decode()
        pos += value_len
    return headers


def encode_record(
    subject: str, payload: bytes, key: str | None, headers: dict[str, str] | None, explicit_id: str | None
) -> bytes:
    """One record's bytes. The common case (no key, id or headers) takes the first branch."""
    subject_bytes = _encode_subject(subject)
    if key is None and not headers and explicit_id is None:
        return _RECORD.pack(3 + len(subject_bytes) + len(payload), 0, len(subject_bytes)) + (
            subject_bytes + payload
        )
    flags = 0
    parts = [b"", subject_bytes]
    if explicit_id is not None:
        id_bytes = explicit_id.encode()
        if not id_bytes or len(id_bytes) > MAX_ID_BYTES:
            raise InvalidMessageError(f"message id {explicit_id!r} must be 1 to 255 bytes")
        flags |= EXPLICIT_ID
        parts += (_U8.pack(len(id_bytes)), id_bytes)
    if key is not None:
        key_bytes = key.encode()
        if len(key_bytes) > MAX_KEY_BYTES:
            raise InvalidMessageError("message key must be at most 65535 bytes")
        flags |= KEY
        parts += (_U16.pack(len(key_bytes)), key_bytes)
    if headers:
        header_bytes = encode_headers(headers)
        flags |= HEADERS
        parts += (_U32.pack(len(header_bytes)), header_bytes)
    parts.append(payload)
    body_length = sum(map(len, parts))
    parts[0] = _RECORD.pack(3 + body_length, flags, len(subject_bytes))
    return b"".join(parts)


def encode_plain_records(subject: str, payloads: Sequence[bytes]) -> list[bytes]:
    """Records with only a subject and a payload: the bulk-publish fast path."""
    subject_bytes = _encode_subject(subject)
    overhead = 3 + len(subject_bytes)
    pack = _RECORD.pack
    subject_len = len(subject_bytes)
    sizes = set(map(len, payloads))
    if len(sizes) == 1:
        # Payloads of one size (the usual bulk load) share their record head: one concatenation each.
        head = pack(overhead + sizes.pop(), 0, subject_len) + subject_bytes
        return [head + p for p in payloads]
    return [pack(overhead + len(p), 0, subject_len) + subject_bytes + p for p in payloads]


def encode_batch(
    base_offset: int, timestamp_ns: int, base_id: int, records: Sequence[bytes], attributes: int = 0
) -> bytes:
    tail = _AFTER_CRC.pack(
        base_offset, len(records), timestamp_ns, base_id >> 64, base_id & 0xFFFFFFFFFFFFFFFF
    ) + b"".join(records)
    crc = crc32c(tail, _ATTRIBUTE_CRC[attributes])
    return _BEFORE_CRC.pack(MAGIC, attributes, _CRC_START + len(tail), crc) + tail


class BatchHeader:
    """The fixed part of a batch, parsed without touching its records."""

    __slots__ = ("attributes", "base_id", "base_offset", "count", "crc", "length", "timestamp_ns")

    def __init__(self, buf: bytes | memoryview, pos: int) -> None:
        magic, attributes, length, crc, base_offset, count, ts, id_hi, id_lo = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise ValueError(f"bad magic byte {magic:#x}")
        if length < HEADER_SIZE:
            raise ValueError(f"batch length {length} is shorter than a header")
        self.attributes: int = attributes
        self.length: int = length
        self.crc: int = crc
        self.base_offset: int = base_offset
        self.count: int = count
        self.timestamp_ns: int = ts
        self.base_id: int = id_hi << 64 | id_lo

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.count


def crc_ok(buf: bytes | memoryview, pos: int, header: BatchHeader) -> bool:
    initial = _ATTRIBUTE_CRC[header.attributes]
    return crc32c(buf[pos + _CRC_START : pos + header.length], initial) == header.crc


def decode_records(
    buf: bytes,
    pos: int,
    header: BatchHeader,
    stream: str,
    partition: int,
    min_offset: int = 0,
) -> list[Message]:
    """Messages of one (already validated) batch, skipping offsets below ``min_offset``.

    This is the read path's inner loop: messages are built without calling ``__init__``,
    and a run of records on one subject decodes the subject once.
    """
    if header.attributes & UNIFORM:
        return _decode_uniform(buf, pos, header, stream, partition, min_offset)
    end = pos + header.length
    pos += HEADER_SIZE
    offset = header.base_offset
    id_delta = header.base_id - offset
    timestamp = header.timestamp_ns / 1e9
    new = Message.__new__
    unpack_record = _RECORD.unpack_from
    startswith = buf.startswith
    last_raw = b""
    subject = ""
    out: list[Message] = []
    append = out.append
    while pos < end:
        length, flags, subject_len = unpack_record(buf, pos)
        record_end = pos + 4 + length
        if offset < min_offset:
            pos = record_end
            offset += 1
            continue
        pos += 7
        if subject_len != len(last_raw) or not startswith(last_raw, pos):
            last_raw = buf[pos : pos + subject_len]
            subject = _decode_subject(last_raw)
        pos += subject_len
        message = new(Message)
        message.subject = subject
        message.stream = stream
        message.partition = partition
        message.offset = offset
        message.timestamp = timestamp
        if flags == 0:
            message._id = None
            message._id_number = id_delta + offset
            message.key = None
            message._headers = None
        else:
            pos = _decode_optional_fields(buf, pos, flags, message, id_delta + offset)
        message.payload = buf[pos:record_end]
        append(message)
        pos = record_end
        offset += 1
    return out


def _decode_uniform(
    buf: bytes, pos: int, header: BatchHeader, stream: str, partition: int, min_offset: int
) -> list[Message]:
    end = pos + header.length
    pos += HEADER_SIZE
    (subject_len,) = _U16.unpack_from(buf, pos + 5)
    subject = _decode_subject(buf[pos + 7 : pos + 7 + subject_len])
    skip = 7 + subject_len
    offset = header.base_offset
    id_delta = header.base_id - offset
    timestamp = header.timestamp_ns / 1e9
    new = Message.__new__
    unpack_length = _U32.unpack_from
    out: list[Message] = []
    append = out.append
    while pos < end:
        (length,) = unpack_length(buf, pos)
        record_end = pos + 4 + length
        if offset >= min_offset:
            message = new(Message)
            message.subject = subject
            message.stream = stream
            message.partition = partition
            message.offset = offset
            message.timestamp = timestamp
            message._id = None
            message._id_number = id_delta + offset
            message.key = None
            message._headers = None
            message.payload = buf[pos + skip : record_end]
            append(message)
        pos = record_end
        offset += 1
    return out


def _decode_optional_fields(buf: bytes, pos: int, flags: int, message: Message, id_number: int) -> int:
    if flags & EXPLICIT_ID:
        id_len = buf[pos]
        message._id = buf[pos + 1 : pos + 1 + id_len].decode()
        message._id_number = None
        pos += 1 + id_len
    else:
        message._id = None
        message._id_number = id_number
    message.key = None
    if flags & KEY:
        (key_len,) = _U16.unpack_from(buf, pos)
        message.key = buf[pos + 2 : pos + 2 + key_len].decode()
        pos += 2 + key_len
    message._headers = None
    if flags & HEADERS:
        (headers_len,) = _U32.unpack_from(buf, pos)
        message._headers = decode_headers(buf[pos + 4 : pos + 4 + headers_len])
        pos += 4 + headers_len
    return pos


def record_facts(buf: bytes, pos: int, header: BatchHeader) -> list[tuple[str, str | None]]:
    """(subject, explicit id) of every record: what recovery needs, without building messages."""
    end = pos + header.length
    pos += HEADER_SIZE
    out = []
    unpack_record = _RECORD.unpack_from
    while pos < end:
        length, flags, subject_len = unpack_record(buf, pos)
        record_end = pos + 4 + length
        subject = _decode_subject(buf[pos + 7 : pos + 7 + subject_len])
        explicit_id = None
        if flags & EXPLICIT_ID:
            at = pos + 7 + subject_len
            explicit_id = buf[at + 1 : at + 1 + buf[at]].decode()
        out.append((subject, explicit_id))
        pos = record_end
    return out
