"""Generic fixtures shared by the test suite."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
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
