"""A schema registry served from a thread, for clients that block (confluent-kafka's)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from pigeon.server.registry import RegistryOptions, running


class RegistryThread:
    def __init__(self, data: Path) -> None:
        self._data = data
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with running(RegistryOptions(data=self._data, port=0)) as http:
            self.url = http.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> RegistryThread:
        self._thread.start()
        assert self._ready.wait(10), "the registry did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()
