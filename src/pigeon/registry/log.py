"""The registry's durable log: one engine stream of JSON events, appended to and replayed at open.

Every change (a registered version, a deletion, a compatibility or mode setting) is one event,
written with ``durability="always"`` before it is applied, so an acknowledged registration
survives a crash and ids never change across restarts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ..engine import Engine, StreamConfig

__all__ = ["LOG_STREAM", "LOG_SUBJECT", "RegistryLog"]

LOG_STREAM = "_schemas"
# A subject no application would publish to by accident: a stream capturing it
# would take whatever a client sent there into the log.
LOG_SUBJECT = "$PIGEON.REGISTRY.log"

log = logging.getLogger("pigeon.registry")


class RegistryLog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def append(self, event: dict[str, Any]) -> None:
        # Created on the first change, so a data folder whose registry was never written to
        # (every `pigeon serve` opens one) shows no extra stream.
        if LOG_STREAM not in self._engine.streams():
            await self._engine.create_stream(
                StreamConfig(name=LOG_STREAM, subjects=(LOG_SUBJECT,), durability="always")
            )
        await self._engine.publish(LOG_SUBJECT, json.dumps(event, separators=(",", ":")).encode())

    async def replay(self) -> AsyncIterator[dict[str, Any]]:
        if LOG_STREAM not in self._engine.streams():
            return
        async for message in self._engine.read(LOG_STREAM, 0):
            try:
                event = json.loads(message.payload)
            except ValueError:
                # Only the registry writes here; a stray record must not keep it from opening.
                log.warning("skipping unreadable registry log record at offset %s", message.offset)
                continue
            if isinstance(event, dict) and "op" in event:
                yield event
            else:
                log.warning("skipping unexpected registry log record at offset %s", message.offset)
