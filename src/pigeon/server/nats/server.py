"""NatsServer: listens for NATS clients and routes messages between their subscriptions.

Routing is synchronous: a PUB is delivered (appended to each receiving connection's output
buffer) before the next operation of the publisher is looked at, so messages from one
publisher reach each subscriber in publish order. Nothing in the routing path awaits, which
is also why one slow connection cannot hold others up: it is cut off once its backlog passes
``max_pending_bytes`` (see :mod:`.connection`).

In-process code (a JetStream layer, system services) plugs in with :meth:`NatsServer.subscribe`
and :meth:`NatsServer.publish`: an internal subscription receives every message on matching
subjects, PUB and HPUB alike, as a :class:`Delivery`, counts as a responder for the
no-responders check, and answers through ``publish(delivery.reply, ...)``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ...errors import InvalidConfigError, InvalidSubjectError, TransportClosedError
from ...subjects import SubjectIndex, patterns_overlap, validate_subject
from .connection import ClientConnection
from .options import ServerOptions
from .protocol import Pub

__all__ = ["NATS_COMPAT_VERSION", "Delivery", "NatsServer", "Outgoing", "Subscription"]

log = logging.getLogger("pigeon.server.nats")

# Clients gate features on the server version they are told (nats-py reads it for
# JetStream API choices), so pigeon advertises the nats-server release whose protocol it speaks.
NATS_COMPAT_VERSION = "2.10.0"

# nats-server's no-responders status, sent to the requester on the reply subject.
_NO_RESPONDERS = b"NATS/1.0 503\r\nNats-Subject: %b\r\n\r\n"
_ROUTE_CACHE_SIZE = 4096


# A message for NatsServer.publish_many: (subject, payload, reply, headers). Receivers see that
# subject (the call's subject only routes), the reply, and the headers (a raw block, or None).
# A plain tuple: JetStream makes one per message it delivers.
Outgoing = tuple[str, bytes, str | None, bytes | None]


class Delivery(NamedTuple):
    """A message as an internal subscription sees it. ``headers`` is the raw block or None;
    ``origin`` is the client connection that published it (None when the server did)."""

    subject: str
    reply: str | None
    headers: bytes | None
    payload: bytes
    origin: ClientConnection | None = None


Handler = Callable[[Delivery], None]
# Takes a client's PUBs in a row under a prefix its subscription owns, as parsed (see
# NatsServer.subscribe).
RawHandler = Callable[[list[Pub], ClientConnection], None]


class Subscription:
    """One subscription: a client's (``conn`` set) or an internal one (``handler`` set)."""

    __slots__ = ("conn", "delivered", "handler", "max_msgs", "queue", "raw", "server", "sid", "subject")

    def __init__(
        self,
        server: NatsServer,
        subject: str,
        queue: str | None,
        sid: bytes,
        conn: ClientConnection | None = None,
        handler: Handler | None = None,
        raw: RawHandler | None = None,
    ) -> None:
        self.server = server
        self.subject = subject
        self.queue = queue
        self.sid = sid
        self.conn = conn
        self.handler = handler
        self.raw = raw
        self.max_msgs: int | None = None
        self.delivered = 0

    def unsubscribe(self) -> None:
        """Stop deliveries; calling it again does nothing."""
        self.server._remove(self)


class _Route(NamedTuple):
    plain: tuple[Subscription, ...]
    groups: tuple[tuple[Subscription, ...], ...]
    clients: bool = True  # whether a client connection may be among them


class NatsServer:
    """A NATS core protocol server on an asyncio loop. ``async with NatsServer(opts)`` or start/stop."""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.server_id = "N" + uuid.uuid4().hex.upper()
        self.slow_consumers = 0
        self._index: SubjectIndex[Subscription] = SubjectIndex(cache_size=0)
        # Every subscription, for the rare publish subject with wildcard tokens, which the
        # index (literal subjects only) cannot answer.
        self._all: set[Subscription] = set()
        self._routes: dict[str, _Route] = {}
        # Routes by subject shape (see _shape): reply inboxes and ack subjects are unique per
        # message, but all of one shape share a route, so they are routed by a dict lookup.
        self._shapes: dict[str, _Route] = {}
        # Internal "PREFIX.>" subscriptions that no other subscription overlaps, by "PREFIX.":
        # every subject under it routes to that one alone (JetStream's acks and API), so the
        # route needs no per-subject lookup: ack subjects are unique and would miss any cache.
        self._owned: dict[str, _Route] = {}
        self._owned_prefixes: tuple[str, ...] = ()
        # The owners that take clients' PUBs raw, and their prefixes (read by the connections).
        self._raw_owners: tuple[tuple[bytes, Subscription], ...] = ()
        self.raw_prefixes: tuple[bytes, ...] = ()
        self._candidates: list[Subscription] = []  # internal "PREFIX.>" subscriptions
        # Per token position, how many patterns hold each literal token there; as long as the
        # longest pattern ever added (longer than needed is harmless).
        self._literals: list[dict[str, int]] = []
        self._turn = 0
        self._connections: set[ClientConnection] = set()
        self._next_client_id = 0
        self._listener: asyncio.Server | None = None
        self._ssl: ssl.SSLContext | None = None
        self._info: dict[str, Any] = {}
        self._disconnect_hooks: list[Callable[[ClientConnection], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._listener is not None:
            raise InvalidConfigError("the server is already started")
        opts = self.options
        if opts.tls:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(str(opts.tls_cert), str(opts.tls_key))
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: ClientConnection(self), opts.host, opts.port, reuse_address=True
        )
        self._info = {
            "server_id": self.server_id,
            "server_name": opts.server_name,
            "version": NATS_COMPAT_VERSION,
            "proto": 1,
            "host": opts.host,
            "port": self.port,
            "headers": True,
            "max_payload": opts.max_payload,
        }
        if opts.auth_required:
            self._info["auth_required"] = True
        if opts.tls:
            self._info["tls_required"] = True
            self._info["tls_available"] = True

    async def stop(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for conn in list(self._connections):
            conn.abort()
        await listener.wait_closed()

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._listener is None or not self._listener.sockets:
            raise TransportClosedError("the server is not started")
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        scheme = "tls" if self.options.tls else "nats"
        return f"{scheme}://{self.options.host}:{self.port}"

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def advertise(self, **fields: Any) -> None:
        """Add fields to the INFO sent to clients that connect from now on (e.g. ``jetstream=True``)."""
        self._info.update(fields)

    # -- in-process API (the hook for JetStream and system services) -----------------------

    def subscribe(
        self, subject: str, handler: Handler, *, queue: str | None = None, raw: RawHandler | None = None
    ) -> Subscription:
        """Call ``handler`` for each message on ``subject`` (a pattern), synchronously.

        The handler runs inside the publisher's read callback, so it must not block; work
        that awaits (storing a message, then acking) belongs in a task or queue it feeds,
        which keeps arrival order if it is one consumer per queue. An exception in the
        handler is logged and does not reach the publisher.

        ``raw``, for a "PREFIX.>" subscription, takes what clients publish there while the
        subscription owns the prefix (no other subscription overlaps it), as the parser made it,
        without routing, several PUBs in a row at a time: the subject is bytes, unchecked, for
        the owner to read (JetStream's acks, one per message, cost no more than that), and the
        order of a client's operations is kept. ``handler`` still gets the rest: what
        the server publishes, what verbose or pedantic clients publish (they are answered per
        operation), and everything while another subscription overlaps.
        """
        subscription = Subscription(self, subject, queue, b"", handler=handler, raw=raw)
        self._add(subscription)
        return subscription

    def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        reply: str | None = None,
        headers: bytes | None = None,
        shown_subject: str | None = None,
        clients_only: bool = False,
    ) -> int:
        """Deliver a message from inside the server; returns how many subscriptions got it.

        ``headers`` is a raw NATS header block (starting ``NATS/1.0``), e.g. a status reply.
        ``shown_subject`` is the subject receivers see in place of ``subject``, which then only
        routes: JetStream hands a stored message to a pull request's inbox under its own subject.
        ``clients_only`` skips internal subscriptions: a message the server has already stored
        goes to client subscribers without being captured again.
        """
        # Validates the subject when it is not a known route already.
        route = self._route_for(subject)
        shown = shown_subject or subject
        return self._fan_out(
            route,
            None,
            shown.encode(),
            reply.encode() if reply else b"",
            len(headers) if headers else 0,
            payload if headers is None else headers + payload,
            clients_only,
            shown,
        )

    def publish_many(self, subject: str, messages: Sequence[Outgoing]) -> None:
        """``publish`` each of ``messages`` to ``subject`` in order, the route looked up once
        (JetStream hands a pull request its messages this way)."""
        route = self._route_for(subject)
        if len(route.plain) == 1 and not route.groups:
            only = route.plain[0]
            if only.conn is not None and only.max_msgs is None:
                only.conn.send_msgs(only.sid, messages)
                only.delivered += len(messages)
                return
        for shown, payload, reply, headers in messages:
            self.publish(subject, payload, reply=reply, headers=headers, shown_subject=shown)

    def on_disconnect(self, hook: Callable[[ClientConnection], None]) -> None:
        """Call ``hook(conn)`` when a client connection ends (state tied to it can go)."""
        self._disconnect_hooks.append(hook)

    # -- routing ---------------------------------------------------------------------------

    def _add(self, subscription: Subscription) -> None:
        # SubjectIndex validates the pattern and raises InvalidSubjectError.
        self._index.add(subscription.subject, subscription)
        self._all.add(subscription)
        literals = self._literals
        for position, token in enumerate(subscription.subject.split(".")):
            if position == len(literals):
                literals.append({})
            if token != "*" and token != ">":
                literals[position][token] = literals[position].get(token, 0) + 1
        self._routes.clear()
        self._shapes.clear()
        self._update_owned(subscription)

    def _add_client_subscription(
        self, conn: ClientConnection, subject: bytes, queue: bytes, sid: bytes
    ) -> Subscription:
        subscription = Subscription(self, subject.decode(), queue.decode() if queue else None, sid, conn=conn)
        self._add(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        if self._index.remove(subscription.subject, subscription):
            literals = self._literals
            for position, token in enumerate(subscription.subject.split(".")):
                counts = literals[position]
                if token in counts:
                    counts[token] -= 1
                    if not counts[token]:
                        del counts[token]
            self._routes.clear()
            self._shapes.clear()
        self._all.discard(subscription)
        if subscription.conn is not None:
            subscription.conn.subs.pop(subscription.sid, None)
        self._update_owned(subscription)

    def _update_owned(self, changed: Subscription) -> None:
        """Recompute the owned prefixes if ``changed`` (just added or removed) is a candidate
        or overlaps one; other subscriptions cost a check against the few candidates."""
        if _owned_prefix(changed) is not None:
            if changed in self._all:
                self._candidates.append(changed)
            elif changed in self._candidates:
                self._candidates.remove(changed)
        elif not any(patterns_overlap(c.subject, changed.subject) for c in self._candidates):
            return
        owned: dict[str, _Route] = {}
        for candidate in self._candidates:
            prefix = _owned_prefix(candidate)
            others = (s for s in self._all if s is not candidate)
            if prefix and not any(patterns_overlap(s.subject, candidate.subject) for s in others):
                owned[prefix] = _Route((candidate,), (), False)
        self._owned = owned
        self._owned_prefixes = tuple(owned)
        self._raw_owners = tuple(
            (prefix.encode(), route.plain[0]) for prefix, route in owned.items() if route.plain[0].raw
        )
        self.raw_prefixes = tuple(prefix for prefix, _ in self._raw_owners)

    def hand_raw(self, conn: ClientConnection, ops: list[Pub]) -> None:
        """Give ``ops``, PUBs in a row from ``conn`` whose subjects start with one of
        ``raw_prefixes``, to the subscriptions that own those prefixes, in order."""
        first = 0
        while first < len(ops):
            prefix, owner = next(p for p in self._raw_owners if ops[first].subject.startswith(p[0]))
            end = first + 1
            while end < len(ops) and ops[end].subject.startswith(prefix):
                end += 1
            assert owner.raw is not None
            owner.delivered += end - first
            try:
                owner.raw(ops[first:end] if first or end < len(ops) else ops, conn)
            except Exception:
                log.exception("internal subscription handler for %r failed", owner.subject)
            first = end

    def _route_for(self, subject: str) -> _Route:
        route = self._routes.get(subject)
        if route is not None:
            return route
        if subject.startswith(self._owned_prefixes):
            for prefix, owned in self._owned.items():
                if subject.startswith(prefix):
                    return owned
        try:
            validate_subject(subject)
        except InvalidSubjectError:
            shape = None  # a wildcard publish (routed literally) or no subject at all: _match says
        else:
            shape = self._shape(subject)
            route = self._shapes.get(shape)
        if route is None:
            route = self._new_route(subject)
            if shape is not None:
                if len(self._shapes) >= _ROUTE_CACHE_SIZE:
                    self._shapes.clear()
                self._shapes[shape] = route
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[subject] = route
        return route

    def _shape(self, subject: str) -> str:
        """What the route of a valid ``subject`` depends on: a token where some pattern has it
        literally in that place, else "" (it can only meet wildcards there); and past the
        longest pattern, only that there are more tokens."""
        literals = self._literals
        tokens = subject.split(".", len(literals))
        count = len(tokens)
        if count > len(literals):
            tokens[-1] = ">"
        for position, counts in enumerate(literals):  # a plain loop: it runs per reply sent
            if position == count:
                break
            if tokens[position] not in counts:
                tokens[position] = ""
        return ".".join(tokens)

    def _new_route(self, subject: str) -> _Route:
        plain: list[Subscription] = []
        groups: dict[tuple[str, str], list[Subscription]] = {}
        for subscription in self._match(subject):
            if subscription.queue is None:
                plain.append(subscription)
            else:
                groups.setdefault((subscription.subject, subscription.queue), []).append(subscription)
        members = tuple(tuple(members) for members in groups.values())
        clients = any(s.conn is not None for s in plain) or any(
            m.conn is not None for g in members for m in g
        )
        return _Route(tuple(plain), members, clients)

    def _match(self, subject: str) -> tuple[Subscription, ...]:
        try:
            return self._index.match(subject)
        except InvalidSubjectError:
            tokens = _wildcard_subject_tokens(subject)
        return tuple(s for s in self._all if _literal_match(s.subject.split("."), tokens))

    def route(
        self,
        origin: ClientConnection | None,
        subject: bytes,
        reply: bytes,
        header_size: int,
        data: bytes,
        shown: bytes | None = None,
        clients_only: bool = False,
    ) -> int:
        """Deliver one message to every matching subscription and one member per queue group.

        A subject with ``*`` or ``>`` tokens is routed literally, as nats-server does: those
        tokens match the same token or a wildcard of a subscription (JetStream API subjects
        embed filters this way). Raises InvalidSubjectError (or UnicodeDecodeError) for
        anything else that is not a valid subject (empty tokens, whitespace), except under an
        owned prefix (see ``_owned``): those all go to the owner unchecked, which reads their
        tokens itself (JetStream's acks and API answer or ignore what does not fit). Returns the
        number of deliveries. ``shown``, when given, is the subject written in the MSG/HMSG
        lines instead of ``subject`` (see :meth:`publish`).
        """
        text = subject.decode()
        route = self._route_for(text)
        delivered = self._fan_out(
            route, origin, shown or subject, reply, header_size, data, clients_only, None if shown else text
        )
        if not delivered and reply and origin is not None and origin.no_responders:
            self._no_responders(origin, subject, reply)
        return delivered

    def _fan_out(
        self,
        route: _Route,
        origin: ClientConnection | None,
        shown: bytes,
        reply: bytes,
        header_size: int,
        data: bytes,
        clients_only: bool,
        text: str | None,
    ) -> int:
        """Deliver to ``route``; ``text`` is ``shown`` decoded, when the caller has it."""
        if clients_only:
            route = _Route(
                tuple(s for s in route.plain if s.conn is not None),
                tuple(
                    g
                    for g in (tuple(m for m in members if m.conn is not None) for members in route.groups)
                    if g
                ),
            )
        if not route.clients and not route.groups:
            # Internal subscriptions only (JetStream's): one Delivery for all, no MSG lines.
            delivery = Delivery(
                shown.decode() if text is None else text,
                reply.decode() if reply else None,
                data[:header_size] if header_size else None,
                data[header_size:] if header_size else data,
                origin,
            )
            for subscription in route.plain:
                self._handle(subscription, delivery)
            return len(route.plain)
        no_echo = origin is not None and not origin.echo
        delivered = 0
        pieces = _Pieces(shown, reply, header_size, data, origin, text)
        for subscription in route.plain:
            if no_echo and subscription.conn is origin:
                continue
            self._deliver(subscription, pieces)
            delivered += 1
        for members in route.groups:
            self._turn += 1
            count = len(members)
            for step in range(count):
                member = members[(self._turn + step) % count]
                if not (no_echo and member.conn is origin):
                    self._deliver(member, pieces)
                    delivered += 1
                    break
        return delivered

    def _deliver(self, subscription: Subscription, pieces: _Pieces) -> None:
        conn = subscription.conn
        if conn is None:
            self._handle(subscription, pieces.delivery())
            return
        conn.send_msg(subscription.sid, pieces)
        subscription.delivered += 1
        if subscription.max_msgs is not None and subscription.delivered >= subscription.max_msgs:
            self._remove(subscription)

    def _handle(self, subscription: Subscription, delivery: Delivery) -> None:
        """Give ``delivery`` to an internal subscription."""
        assert subscription.handler is not None
        try:
            subscription.handler(delivery)
        except Exception:
            log.exception("internal subscription handler for %r failed", subscription.subject)
        subscription.delivered += 1
        if subscription.max_msgs is not None and subscription.delivered >= subscription.max_msgs:
            self._remove(subscription)

    def _no_responders(self, origin: ClientConnection, subject: bytes, reply: bytes) -> None:
        try:
            route = self._route_for(reply.decode())
        except ValueError:  # an invalid reply subject has no subscription to tell
            return
        status = _NO_RESPONDERS % subject
        pieces = _Pieces(reply, b"", len(status), status)
        for subscription in route.plain + tuple(m for members in route.groups for m in members):
            if subscription.conn is origin:
                self._deliver(subscription, pieces)

    # -- connection bookkeeping (used by ClientConnection) ---------------------------------

    def _connected(self, conn: ClientConnection) -> dict[str, Any]:
        self._connections.add(conn)
        self._next_client_id += 1
        return {**self._info, "client_id": self._next_client_id}

    def _disconnected(self, conn: ClientConnection) -> None:
        self._connections.discard(conn)
        for subscription in list(conn.subs.values()):
            self._remove(subscription)
        for hook in self._disconnect_hooks:
            try:
                hook(conn)
            except Exception:
                log.exception("disconnect hook failed")

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl


def _owned_prefix(subscription: Subscription) -> str | None:
    """The "PREFIX." of an internal subscription to "PREFIX.>" (literal tokens), else None."""
    if subscription.handler is None or subscription.queue is not None:
        return None
    prefix, _, last = subscription.subject.rpartition(".")
    if last != ">" or not prefix or "*" in prefix.split("."):
        return None
    return prefix + "."


def _wildcard_subject_tokens(subject: str) -> list[str]:
    """The tokens of a publish subject whose wildcards are plain tokens; raises if still invalid."""
    # Same-length stand-ins keep every other rule (token shape, whitespace, byte limit) checked.
    validate_subject(subject.replace("*", "_").replace(">", "_"))
    return subject.split(".")


def _literal_match(pattern: list[str], subject: list[str]) -> bool:
    for i, token in enumerate(pattern):
        if token == ">":
            return len(subject) > i
        if i >= len(subject) or (token != "*" and token != subject[i]):
            return False
    return len(pattern) == len(subject)


class _Pieces:
    """One published message, with the protocol lines built lazily and shared by all receivers."""

    __slots__ = (
        "_delivery",
        "data",
        "header_size",
        "hmsg_tail",
        "msg_tail",
        "origin",
        "payload",
        "reply",
        "subject",
        "text",
    )

    def __init__(
        self,
        subject: bytes,
        reply: bytes,
        header_size: int,
        data: bytes,
        origin: ClientConnection | None = None,
        text: str | None = None,
    ) -> None:
        self.subject = subject
        self.text = text
        self.origin = origin
        self.reply = reply
        self.header_size = header_size
        self.data = data
        self.payload = data[header_size:] if header_size else data
        self._delivery: Delivery | None = None
        space_reply = b" " + reply if reply else b""
        # "MSG <subject> <sid>" + this tail, and the same for HMSG with both sizes.
        self.msg_tail = b"%b %d\r\n" % (space_reply, len(self.payload))
        self.hmsg_tail = b"%b %d %d\r\n" % (space_reply, header_size, len(data)) if header_size else b""

    def delivery(self) -> Delivery:
        if self._delivery is None:
            headers = self.data[: self.header_size] if self.header_size else None
            reply = self.reply.decode() if self.reply else None
            text = self.subject.decode() if self.text is None else self.text
            self._delivery = Delivery(text, reply, headers, self.payload, self.origin)
        return self._delivery
