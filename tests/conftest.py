"""Generic fixtures shared by the test suite."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh, not yet existing data folder inside the test's temporary directory."""
    return tmp_path / "data"


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect what the running loop reports to its exception handler during the test.

    Background tasks that fail without anyone awaiting them only surface here ("Task
    exception was never retrieved"), so a test can assert that none did. Collecting the
    garbage first makes finished-but-unreferenced tasks report now rather than later.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        gc.collect()
        loop.set_exception_handler(previous)


TRANSPORTS = ["memory", "embedded", "pigeon", "nats", "redis", "rabbitmq", "postgres"]


@pytest.fixture(scope="session")
def pigeon_serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `pigeon serve` process for the session's ``pigeon`` transport runs (nats:// to it)."""
    from serve_process import Served

    served = Served(tmp_path_factory.mktemp("pigeon-serve") / "data").wait_listening()
    yield served.nats_url
    served.kill()


@pytest.fixture(params=TRANSPORTS)
async def any_transport(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An open transport of each kind: in-process ones, pigeon serve, then the machine's real brokers."""
    from pigeon.testing.services import require_service
    from pigeon.transport import connect

    kind = request.param
    if kind == "memory":
        url = "memory://"
    elif kind == "embedded":
        url = f"file://{tmp_path / 'broker'}"
    elif kind == "pigeon":
        url = request.getfixturevalue("pigeon_serve_url")
    else:
        url = require_service(kind)
    transport = await connect(url)
    try:
        yield transport
    finally:
        await transport.close()


@pytest.fixture
async def make_stream(any_transport: Any) -> AsyncIterator[Any]:
    """``await make_stream(partitions=1, **limits)`` creates a fresh stream on ``any_transport``
    and returns (name, subject prefix); every stream made is deleted after the test, and so
    are the streams a test adds to ``make_stream.created`` (retry streams, say)."""
    from pigeon.testing.services import unique_name
    from pigeon.transport.base import StreamSpec

    created: list[str] = []

    async def make(partitions: int = 1, **limits: Any) -> tuple[str, str]:
        name = unique_name("s")
        prefix = name.replace("-", "_")
        await any_transport.create_stream(StreamSpec(name, (f"{prefix}.>",), partitions=partitions, **limits))
        created.append(name)
        return name, prefix

    make.created = created  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for name in reversed(created):
            with contextlib.suppress(Exception):
                await any_transport.delete_stream(name)
