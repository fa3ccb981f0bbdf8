"""Confluent's wire format: magic byte 0, the schema id as 4 big-endian bytes, then the payload.

Protobuf payloads carry, between the id and the message, the path of the message type within
its file: a count and the indexes, each a zigzag varint; the first message type, ``[0]``, is
written as a single 0 byte.
"""

from __future__ import annotations

import struct

from ..errors import PayloadDecodeError

__all__ = ["frame", "read_message_indexes", "unframe", "write_message_indexes"]

MAGIC = 0
_HEADER = struct.Struct(">bI")


def frame(schema_id: int, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, schema_id) + payload


def unframe(data: bytes) -> tuple[int, bytes]:
    """(schema id, the rest); `PayloadDecodeError` when ``data`` is not in the wire format."""
    if len(data) < _HEADER.size or data[0] != MAGIC:
        raise PayloadDecodeError(
            "payload is not in the schema registry's wire format (magic byte 0 and a 4-byte schema id)"
        )
    _, schema_id = _HEADER.unpack_from(data)
    return schema_id, data[_HEADER.size :]


def write_message_indexes(indexes: list[int]) -> bytes:
    if indexes == [0]:
        return b"\x00"
    return b"".join(_zigzag_varint(n) for n in (len(indexes), *indexes))


def read_message_indexes(data: bytes) -> tuple[list[int], bytes]:
    """(the message indexes, the protobuf message bytes after them)."""
    count, position = _read_zigzag_varint(data, 0)
    if count == 0:
        return [0], data[position:]
    if count < 0 or count > len(data):
        raise PayloadDecodeError(f"bad protobuf message index count {count}")
    indexes = []
    for _ in range(count):
        index, position = _read_zigzag_varint(data, position)
        indexes.append(index)
    return indexes, data[position:]


def _zigzag_varint(value: int) -> bytes:
    encoded = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = encoded & 0x7F
        encoded >>= 7
        if encoded:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_zigzag_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise PayloadDecodeError("truncated protobuf message indexes")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), position
