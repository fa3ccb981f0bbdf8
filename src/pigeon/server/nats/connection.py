"""One client connection: protocol state, output batching, slow-consumer and stale detection.

Output is appended to a list and written once per event-loop turn, so a burst of deliveries
costs one ``transport.write``. The bytes queued for a client (that list plus the transport's
own buffer) are bounded by ``max_pending_bytes``: past it the client is a slow consumer, its
subscriptions are removed at once and its socket is closed, so it can neither stall
publishers nor grow the server's memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import InvalidSubjectError
from ...subjects import validate_subject
from .protocol import (
    ERR_AUTH_TIMEOUT,
    ERR_AUTHORIZATION,
    ERR_INVALID_PUBLISH_SUBJECT,
    ERR_INVALID_SUBJECT,
    ERR_PARSER,
    ERR_SLOW_CONSUMER,
    ERR_STALE,
    Connect,
    Op,
    Parser,
    Ping,
    Pong,
    ProtocolError,
    Pub,
    Sub,
    Unsub,
)

if TYPE_CHECKING:
    from .server import NatsServer, Outgoing, Subscription, _Pieces

__all__ = ["ClientConnection"]

log = logging.getLogger("pigeon.server.nats")

_OK = b"+OK\r\n"
_PING = b"PING\r\n"
_PONG = b"PONG\r\n"
_CRLF = b"\r\n"
# How long a closing connection may take to flush its last bytes (-ERR included) before
# the socket is dropped; a client that has stopped reading would otherwise hold it forever.
_CLOSE_GRACE_S = 1.0


def _valid_subject(subject: bytes) -> bool:
    try:
        validate_subject(subject.decode())
    except (InvalidSubjectError, UnicodeDecodeError):
        return False
    return True


def _equal(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: NatsServer) -> None:
        self.server = server
        opts = server.options
        self.parser = Parser(opts.max_payload, opts.max_control_line)
        self.subs: dict[bytes, Subscription] = {}
        # nats-server's defaults until CONNECT says otherwise (CONNECT {} keeps them).
        self.verbose = True
        self.pedantic = True
        # Neither +OK nor subject complaints: a PUB needs no answer (until CONNECT, it does).
        self._answers_none = False
        self.echo = True
        self.headers = False
        self.no_responders = False
        self.name = ""
        self._connected = not opts.auth_required
        self._max_pending = opts.max_pending_bytes
        self._out: list[bytes] = []
        self._pending = 0
        self._transport_pending = 0
        self._flush_scheduled = False
        self._closed = False
        self._pings_out = 0
        self._loop = asyncio.get_running_loop()
        self._auth_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        info = self.server._connected(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            info["client_ip"] = peer[0]
        opts = self.server.options
        if self.server.ssl_context is not None:
            # The client starts its TLS handshake once it has read INFO; nothing may be read
            # in plain text before start_tls takes the socket over.
            transport.pause_reading()
            transport.write(b"INFO " + json.dumps(info, separators=(",", ":")).encode() + _CRLF)
            self._tls_task = self._loop.create_task(self._start_tls(self.server.ssl_context))
        else:
            transport.write(b"INFO " + json.dumps(info, separators=(",", ":")).encode() + _CRLF)
        if opts.auth_required:
            self._auth_timer = self._loop.call_later(opts.auth_timeout_s, self.fail, ERR_AUTH_TIMEOUT)
        self._ping_timer = self._loop.call_later(opts.ping_interval_s, self._ping_tick)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        try:
            tls = await self._loop.start_tls(
                self.transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.server.options.auth_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            log.info("TLS handshake with %s failed: %s", self._peer(), error)
            self.abort()
            return
        if self._closed or tls is None:
            return
        self.transport = tls

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        error: ProtocolError | None = None
        try:
            ops = self.parser.feed(data)
        except ProtocolError as fault:
            ops, error = fault.ops, fault
        raw: list[Pub] = []  # PUBs in a row for subscriptions that take them raw
        for op in ops:
            if type(op) is Pub and self._connected:  # most operations: one call less
                if (
                    op.subject.startswith(self.server.raw_prefixes)
                    and self._answers_none
                    and (self.headers or not op.header_size)
                ):
                    raw.append(op)
                    continue
                if raw:
                    self.server.hand_raw(self, raw)
                    raw = []
                self._pub(op)
            else:
                if raw:  # before a SUB or UNSUB can change who owns what
                    self.server.hand_raw(self, raw)
                    raw = []
                self._dispatch(op)
            if self._closed:
                return
        if raw:
            self.server.hand_raw(self, raw)
        if error is not None:
            self.fail(error.text)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._shut()

    # -- operations ------------------------------------------------------------------------

    def _dispatch(self, op: Op) -> None:
        kind = type(op)
        if not self._connected and kind is not Connect:
            self.fail(ERR_AUTHORIZATION)
            return
        if kind is Pub:
            assert isinstance(op, Pub)
            self._pub(op)
        elif kind is Sub:
            assert isinstance(op, Sub)
            self._sub(op)
        elif kind is Unsub:
            assert isinstance(op, Unsub)
            self._unsub(op)
        elif kind is Ping:
            self.send(_PONG)
        elif kind is Pong:
            self._pings_out = 0
        else:
            assert isinstance(op, Connect)
            self._connect(op.options)

    def _connect(self, options: dict[str, Any]) -> None:
        opts = self.server.options
        if opts.token is not None:
            authorized = _equal(options.get("auth_token"), opts.token)
        elif opts.user is not None and opts.password is not None:
            authorized = _equal(options.get("user"), opts.user) & _equal(options.get("pass"), opts.password)
        else:
            authorized = True
        if not authorized:
            self.fail(ERR_AUTHORIZATION)
            return
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self._connected = True
        self.verbose = bool(options.get("verbose", self.verbose))
        self.pedantic = bool(options.get("pedantic", self.pedantic))
        self._answers_none = not self.verbose and not self.pedantic
        self.echo = bool(options.get("echo", self.echo))
        self.headers = bool(options.get("headers", self.headers))
        # The no-responders status is a header, so it needs a client that reads headers.
        self.no_responders = self.headers and bool(options.get("no_responders", False))
        name = options.get("name")
        self.name = name if isinstance(name, str) else ""
        if self.verbose:
            self.send(_OK)

    def _pub(self, op: Pub) -> None:
        if op.header_size and not self.headers:
            self.fail(ERR_PARSER)
            return
        # nats-server's order: the subject complaint, then +OK, then the deliveries.
        if self.pedantic and not _valid_subject(op.subject):
            self.send(b"-ERR '%b'\r\n" % ERR_INVALID_PUBLISH_SUBJECT.encode())
        if self.verbose:
            self.send(_OK)
        try:  # noqa: SIM105 - contextlib.suppress costs 0.3 us on every message
            self.server.route(self, op.subject, op.reply, op.header_size, op.data)
        except (InvalidSubjectError, UnicodeDecodeError):
            # nats-server would still deliver to subscriptions matching it literally; a
            # subject that is not valid cannot be matched here, so it reaches no one.
            pass

    def _sub(self, op: Sub) -> None:
        if op.sid in self.subs:
            if self.verbose:
                self.send(_OK)
            return
        try:
            subscription = self.server._add_client_subscription(self, op.subject, op.queue, op.sid)
        except (InvalidSubjectError, UnicodeDecodeError):
            self.send(b"-ERR '%b'\r\n" % ERR_INVALID_SUBJECT.encode())
            return
        self.subs[op.sid] = subscription
        if self.verbose:
            self.send(_OK)

    def _unsub(self, op: Unsub) -> None:
        subscription = self.subs.get(op.sid)
        if subscription is not None:
            if op.max_msgs is None or subscription.delivered >= op.max_msgs:
                subscription.unsubscribe()
            else:
                subscription.max_msgs = op.max_msgs
        if self.verbose:
            self.send(_OK)

    # -- output ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        self._out.append(data)
        self._pending += len(data)
        self._after_append()

    def send_msg(self, sid: bytes, pieces: _Pieces) -> None:
        """Queue a MSG (or HMSG, for a client that reads headers) for this client."""
        if self._closed:
            return
        out = self._out
        if pieces.header_size and self.headers:
            line = b"HMSG " + pieces.subject + b" " + sid + pieces.hmsg_tail
            body = pieces.data
        else:
            line = b"MSG " + pieces.subject + b" " + sid + pieces.msg_tail
            body = pieces.payload
        out.append(line)
        out.append(body)
        out.append(_CRLF)
        self._pending += len(line) + len(body) + 2
        self._after_append()

    def send_msgs(self, sid: bytes, messages: Sequence[Outgoing]) -> None:
        """Queue a MSG (or HMSG) for each of ``messages``, as ``send_msg`` would one by one."""
        if self._closed:
            return
        out = self._out
        size = 0
        headers_read = self.headers
        for subject, payload, reply, headers in messages:
            space_reply = b" " + reply.encode() if reply else b""
            if headers and headers_read:
                line = b"HMSG %b %b%b %d %d\r\n%b" % (
                    subject.encode(),
                    sid,
                    space_reply,
                    len(headers),
                    len(headers) + len(payload),
                    headers,
                )
            else:
                line = b"MSG %b %b%b %d\r\n" % (subject.encode(), sid, space_reply, len(payload))
            out += (line, payload, _CRLF)
            size += len(line) + len(payload) + 2
        self._pending += size
        self._after_append()

    def _after_append(self) -> None:
        if self._pending + self._transport_pending > self._max_pending:
            # The cached transport figure may be stale (it only grows at flush): look again.
            assert self.transport is not None
            self._transport_pending = self.transport.get_write_buffer_size()
            if self._pending + self._transport_pending > self._max_pending:
                self._slow_consumer()
                return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or not self._out or self.transport is None:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._pending = 0
        self.transport.write(data)
        self._transport_pending = self.transport.get_write_buffer_size()

    def _slow_consumer(self) -> None:
        self.server.slow_consumers += 1
        log.warning(
            "slow consumer %s (%r): over %d pending bytes, disconnecting",
            self._peer(),
            self.name,
            self._max_pending,
        )
        # What is still unsent is dropped; the -ERR goes after what the transport holds.
        self._out.clear()
        self._pending = 0
        self.fail(ERR_SLOW_CONSUMER)

    # -- timers and closing ----------------------------------------------------------------

    def _ping_tick(self) -> None:
        if self._closed:
            return
        if self._pings_out >= self.server.options.max_pings_out:
            self.fail(ERR_STALE)
            return
        self._pings_out += 1
        self.send(_PING)
        self._ping_timer = self._loop.call_later(self.server.options.ping_interval_s, self._ping_tick)

    def fail(self, text: str) -> None:
        """Send ``-ERR 'text'`` and close."""
        if self._closed:
            return
        self._flush()
        transport = self.transport
        self._shut()
        if transport is not None:
            # Straight to the transport: through send() a slow consumer would trip again.
            transport.write(b"-ERR '%b'\r\n" % text.encode())
            transport.close()
            self._abort_timer = self._loop.call_later(_CLOSE_GRACE_S, transport.abort)

    def abort(self) -> None:
        """Close at once, dropping anything unsent."""
        self._shut()
        if self.transport is not None:
            self.transport.abort()

    def _shut(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.clear()
            for timer in (self._auth_timer, self._ping_timer):
                if timer is not None:
                    timer.cancel()
            if self._tls_task is not None:
                self._tls_task.cancel()
            self.server._disconnected(self)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "client"
