"""Running the `pigeon` command line as a process, as a user would, for tests/test_cli.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec

T = 30.0


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PIGEON_URL"}
    env["COLUMNS"] = "200"  # tables not cut for the assertions
    return env | (extra or {})


def cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=T,
        env=_env(env),
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def ok(*args: str, stdin: str | None = None) -> str:
    done = cli(*args, stdin=stdin)
    assert done.returncode == 0, f"pigeon {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


class Background:
    """A command that waits for messages (sub, reply): started, then read once it said it listens."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pigeon.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )

    def wait_listening(self) -> Background:
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # the first line: "listening ..." or the error
        assert "listening" in line or "answering" in line, line + self.process.stderr.read()
        return self

    def finish(self) -> tuple[int, str]:
        try:
            out, _ = self.process.communicate(timeout=T)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode, out


def make_folder(folder: Path, stream: str, partitions: int, messages: int, *, dead: int = 0) -> None:
    """A data folder with a stream of ``messages`` keyed messages ("m0", "m1", ...) and, when
    ``dead``, that many dead letters of group ``billing`` (given up at once)."""

    async def make() -> None:
        transport = await connect(f"file://{folder}")
        try:
            await transport.create_stream(StreamSpec(stream, (f"{stream}.>",), partitions=partitions))
            for i in range(messages):
                await transport.publish(f"{stream}.new", b"m%d" % i, key=f"k{i % 5}")
            if dead:
                consumer = await transport.consumer(stream, ConsumerSpec("billing", max_deliver=1))
                for received in await consumer.fetch(dead, 1):
                    await received.term(ValueError(f"bad {received.message.payload.decode()}"))
                await consumer.close()
        finally:
            await transport.close()

    asyncio.run(make())


def groups_of(folder: Path, stream: str) -> list[str]:
    async def read() -> list[str]:
        transport = await connect(f"file://{folder}")
        try:
            engine = transport.engine  # type: ignore[attr-defined]
            return list(engine.groups(stream))
        finally:
            await transport.close()

    return asyncio.run(read())
