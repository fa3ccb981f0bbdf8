"""What the client commands share: where the broker is, option parsers, and one-line errors.

Every command reaches its broker through `pigeon.transport.connect`, so each works on any
transport URL. The read-only ones also take ``--data DIR``: the embedded transport on that
folder, which only works while no server holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer

from ..engine.config import StartAt
from ..errors import DataDirLockedError, InvalidConfigError, PigeonError, TransportClosedError
from ..transport import connect
from ..transport.base import Received, Transport

__all__ = [
    "DEFAULT_URL",
    "DataOption",
    "Header",
    "JsonOption",
    "UrlOption",
    "ack_all",
    "confirm",
    "fail",
    "headers_of",
    "opened",
    "parse_duration",
    "parse_header",
    "parse_size",
    "parse_start",
    "parse_time",
    "read_payload",
    "run",
]

T = TypeVar("T")

DEFAULT_URL = "nats://127.0.0.1:4333"  # a local `pigeon serve` with its default port

UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="PIGEON_URL",
        help="The broker: nats:// (pigeon serve or NATS), redis://, amqp://, postgresql://, file://DIR.",
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Open this data folder directly instead of --url (not while a pigeon serve holds it).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

# Default ports, for the reachability probe, of the schemes that name a network server.
_PORTS = {"nats": 4222, "redis": 6379, "amqp": 5672, "postgresql": 5432, "postgres": 5432}
_PROBE_S = 3.0
_ACKS_AT_ONCE = 16


def run(command: str, main: Coroutine[Any, Any, T], *, interrupted: int = 130) -> T:
    """Run a command's coroutine; what goes wrong ends as ``pigeon <command>: <message>``.

    Ctrl-C exits with ``interrupted``: 0 for the commands that run until it.
    """
    try:
        return asyncio.run(main)
    except BrokenPipeError:
        raise reader_gone() from None
    except (PigeonError, OSError, TimeoutError) as error:
        fail(command, str(error) or f"{type(error).__name__} (timed out)")
    except KeyboardInterrupt:
        raise typer.Exit(interrupted) from None


def reader_gone() -> typer.Exit:
    """Stop quietly when whoever reads stdout went away (``pigeon replay | head``), with status 1
    as click does for output written outside a command's event loop; stdout goes to /dev/null
    so the interpreter's last flush cannot fail too."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return typer.Exit(1)


def fail(command: str, message: str, code: int = 1) -> NoReturn:
    typer.echo(f"pigeon {command}: {message}", err=True)
    raise typer.Exit(code)


def confirm(command: str, question: str, yes: bool) -> None:
    """Go on with a destructive command: ``--yes``, or a person who says so at a terminal."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(command, f"{question} Refusing without --yes (stdin is not a terminal)")
    if not typer.confirm(question):
        fail(command, "cancelled")


def read_payload(command: str, data: str | None, file: Path | None = None) -> bytes:
    """DATA as given, ``-`` for stdin, or the contents of ``--file``."""
    if data is not None and file is not None:
        fail(command, "give the payload as DATA or --file, not both", code=2)
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as error:
            fail(command, f"cannot read {file}: {error.strerror}")
    if data == "-":
        return sys.stdin.buffer.read()
    return (data or "").encode()


async def ack_all(deliveries: Sequence[Received]) -> None:
    """Acknowledge a batch: a few at a time, as each may take one of a bounded pool's connections."""
    for start in range(0, len(deliveries), _ACKS_AT_ONCE):
        await asyncio.gather(*(d.ack() for d in deliveries[start : start + _ACKS_AT_ONCE]))


@contextlib.asynccontextmanager
async def opened(url: str, data: Path | None = None) -> AsyncIterator[Transport]:
    """The transport for ``--data`` if given, else for ``--url``; closed on the way out."""
    if data is not None:
        transport = await _open_folder(data)
    else:
        await _probe(url)
        # A broker that is not there is said once, in the error, not in a warning per retry.
        quiet = logging.getLogger("pigeon.transport")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            transport = await connect(url)
        finally:
            quiet.setLevel(level)
    try:
        yield transport
    finally:
        await transport.close()


async def _open_folder(data: Path) -> Transport:
    folder = await asyncio.to_thread(_existing_folder, data)
    try:
        return await connect(f"file://{folder}")
    except DataDirLockedError as error:
        owner = f"process {error.pid}" if error.pid else "another process"
        raise DataDirLockedError(
            f"data folder {data} is held by {owner} (a running pigeon serve?): "
            f"reach it through that server with --url nats://HOST:PORT",
            pid=error.pid,
        ) from None


def _existing_folder(data: Path) -> Path:
    # Opening a folder that is not there would create an empty one: a typo, most likely.
    if not data.is_dir():
        raise InvalidConfigError(f"no data folder at {data}")
    return data.absolute()


async def _probe(url: str) -> None:
    """Fail at once when nothing listens (a NATS client would retry for its whole timeout)."""
    parts = urlsplit(url)
    if parts.scheme not in _PORTS:
        return
    try:
        host, port = parts.hostname or "127.0.0.1", parts.port or _PORTS[parts.scheme]
    except ValueError:
        raise InvalidConfigError(f"{_redacted(url)} has a bad port") from None
    try:
        async with asyncio.timeout(_PROBE_S):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except (OSError, TimeoutError) as error:
        reason = (
            "connection refused"
            if isinstance(error, ConnectionRefusedError)
            else error.strerror or str(error)
            if isinstance(error, OSError)
            else f"no answer within {_PROBE_S:.0f} s"
        )
        hint = " (start one with `pigeon serve`, or give --url or --data)" if url == DEFAULT_URL else ""
        raise TransportClosedError(f"cannot reach {_redacted(url)}: {reason}{hint}") from None


def _redacted(url: str) -> str:
    """The URL without its credentials, fit for an error message."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}"


# -- option parsers (typer's ``parser=``: their errors name the option) -------------------------


@dataclass(frozen=True)
class Header:
    name: str
    value: str


def parse_header(text: str) -> Header:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise typer.BadParameter(f"{text!r}: write NAME=VALUE")
    return Header(name.strip(), value)


def headers_of(given: list[Header] | None) -> dict[str, str]:
    return {h.name: h.value for h in given or ()}


def parse_time(text: str) -> float:
    """An ISO 8601 time as seconds since the epoch; without a zone it is local time."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time, e.g. 2025-01-31T12:00:00Z") from None


def parse_start(text: str) -> StartAt:
    kind, _, value = text.partition(":")
    if kind in ("earliest", "latest") and not value:
        return StartAt.earliest() if kind == "earliest" else StartAt.latest()
    if kind == "offset" and value.isdigit():
        return StartAt.offset(int(value))
    if kind == "time" and value:
        return StartAt.time(parse_time(value))
    raise typer.BadParameter(f"{text!r}: use earliest, latest, offset:N or time:ISO-8601")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    found = _DURATION.match(text.strip())
    if not found:
        raise typer.BadParameter(f"{text!r}: write seconds, or a number with ms, s, m, h or d (e.g. 15m)")
    return float(found[1]) * _SECONDS[found[2] or "s"]


_SIZE = re.compile(r"^(\d+)\s*([kmg]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    found = _SIZE.match(text.strip())
    if not found:
        raise typer.BadParameter(f"{text!r}: write bytes, or a number with K, M or G (e.g. 64M)")
    return int(found[1]) << 10 * " kmg".index(found[2].lower() or " ")
