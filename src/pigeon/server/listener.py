"""Serving HTTP inside pigeon's own event loop (uvicorn), and the rule on exposing an API."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from ..errors import InvalidConfigError, TransportClosedError

__all__ = ["HttpServer", "check_exposure", "until_stopped"]


def check_exposure(what: str, host: str, token: str | None) -> None:
    """Refuse to serve an API that can change data beyond this machine without a token."""
    if token is None and not _loopback(host):
        raise InvalidConfigError(
            f"refusing to serve {what} on {host} without a token: give --token, or listen on 127.0.0.1"
        )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


GRACEFUL_STOP_S = 5  # how long a stopping HTTP server lets requests in progress finish


class _RequestsCutAtStop(logging.Filter):
    """uvicorn reports the requests it cancels when the grace period runs out as errors with a
    traceback; for a server that is stopping they are expected: one warning line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return False
        if "timeout graceful shutdown exceeded" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("uvicorn.error").addFilter(_RequestsCutAtStop())


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone: ``pigeon serve`` stops it with everything else."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an ASGI app on ``host:port`` (0 picks a free port) until :meth:`stop`."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.host = host
        self._requested_port = port
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            # Without a bound, one client that stalls in the middle of a request would keep
            # the whole server from stopping.
            timeout_graceful_shutdown=GRACEFUL_STOP_S,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # uvicorn reports a failed bind by logging it and calling sys.exit; trying the bind
        # first turns the common case (port in use) into an error that names the address.
        _check_bindable(self.host, self._requested_port)
        self._task = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task = None
                raise InvalidConfigError(f"cannot serve HTTP on {self.host}:{self._requested_port}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (for up to GRACEFUL_STOP_S, then they
        are cancelled and their connections closed); idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._server.should_exit = True
        await task

    @property
    def port(self) -> int:
        if not self._server.started:
            raise TransportClosedError("the HTTP server is not started")
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _check_bindable(host: str, port: int) -> None:
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                reason = os.strerror(error.errno) if error.errno else str(error)
                raise InvalidConfigError(f"cannot serve HTTP on {host}:{port}: {reason}") from None


async def until_stopped() -> None:
    """Return at the first SIGTERM or SIGINT (a server's main loop waits here)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
