"""The memory transport (``memory://``): everything in this process, nothing kept.

Core pub/sub is the in-process bus, with its slow-subscriber policy (`BusOptions`: a
bounded buffer per subscription; drop oldest, drop newest, or block the publisher up to a
timeout; each drop counted and logged). Streams and groups are the embedded engine running
on a temporary folder with durability ``never``, deleted at close: the same semantics as
``file://``, minus durability. Use it for tests and for decoupling components inside one
process.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from .base import Capabilities
from .bus import BusOptions
from .embedded import FULL, EmbeddedOptions, EmbeddedTransport, _options


@dataclass(frozen=True)
class MemoryOptions:
    bus: BusOptions = field(default_factory=BusOptions)


class MemoryTransport(EmbeddedTransport):
    name = "memory"
    capabilities = replace(FULL, durable=False)

    _folder: str

    @classmethod
    async def open(cls, url: str, options: Any = None) -> MemoryTransport:
        memory_options: MemoryOptions = _options(options, MemoryOptions)
        folder = tempfile.mkdtemp(prefix="pigeon-memory-")
        embedded = EmbeddedOptions(durability="never", bus=memory_options.bus)
        transport = await super().open(f"file://{folder}", embedded)
        assert isinstance(transport, MemoryTransport)
        transport._folder = folder
        return transport

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


__all__ = ["BusOptions", "Capabilities", "MemoryOptions", "MemoryTransport"]
