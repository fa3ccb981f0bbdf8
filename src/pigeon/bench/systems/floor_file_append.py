"""The storage floor: length-prefixed records appended to a plain file with ``os.write``.

No index, no checksum, no fsync: the least a durable log can do in Python. A publish is one
write per message; pipelined, one write per batch. Reading back is the ordered consume: records
parsed from 1 MiB reads, the read position written to a side file once per 1000 records (the
batch commit). A file has no acknowledgements, consumers to wake, or core messaging.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from .base import Durable, OnPayload, System, fresh_name

_LENGTH = struct.Struct("<I")
_READ = 1 << 20
_BATCH = 1000


class _File(Durable):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def publish(self, payload: bytes) -> None:
        os.write(self.fd, _LENGTH.pack(len(payload)) + payload)

    async def publish_many(self, payloads: Sequence[bytes]) -> None:
        pack = _LENGTH.pack
        os.write(self.fd, b"".join([pack(len(p)) + p for p in payloads]))

    async def consume(self, count: int, on_payload: OnPayload) -> None:
        raise NotImplementedError("a file has no acknowledgements (FileAppend.unsupported)")

    async def consume_batches(self, count: int, on_payload: OnPayload) -> None:
        unpack = _LENGTH.unpack_from
        seen = position = 0
        buffered = b""
        log = os.open(self.path, os.O_RDONLY)
        mark = os.open(f"{self.path}.position", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while seen < count:
                chunk = os.read(log, _READ)
                if not chunk:
                    raise RuntimeError(f"the file ended after {seen} of {count} records")
                buffered += chunk
                at = 0
                while at + _LENGTH.size <= len(buffered) and seen < count:
                    (length,) = unpack(buffered, at)
                    end = at + _LENGTH.size + length
                    if end > len(buffered):
                        break
                    on_payload(buffered[at + _LENGTH.size : end])
                    at = end
                    seen += 1
                    if seen % _BATCH == 0 or seen == count:
                        os.pwrite(mark, _LENGTH.pack(position + at), 0)
                position += at
                buffered = buffered[at:]
        finally:
            os.close(log)
            os.close(mark)

    def remove(self) -> None:
        os.close(self.fd)
        for path in (self.path, f"{self.path}.position"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class FileAppend(System):
    name = "floor_file_append"
    title = "floor: plain file append"
    kind = "floor"
    unsupported = {
        "consume_ack": "a file has no acknowledgements",
        "pubsub": "a file has no subscribers",
        "request_reply": "a file has no request-reply",
        "e2e_latency": "a file has no consumer to wake when a record arrives",
    }

    @contextlib.asynccontextmanager
    async def durable(self) -> AsyncIterator[Durable]:
        folder = Path(self.where.address)
        log = _File(folder / f"{fresh_name()}.log")
        try:
            yield log
        finally:
            log.remove()
