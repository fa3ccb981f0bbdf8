"""The embedded NATS server against real clients: nats-py, and raw sockets for exact bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from pigeon.errors import InvalidConfigError
from pigeon.server.nats import Delivery, NatsServer, ServerOptions
from pigeon.server.nats.protocol import parse_headers

T = 5.0  # the bound on every single wait

MakeServer = Callable[..., Awaitable[NatsServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    servers: list[NatsServer] = []

    async def make(**options: Any) -> NatsServer:
        server = NatsServer(ServerOptions(port=0, **options))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(make_server: MakeServer) -> NatsServer:
    return await make_server()


@pytest.fixture
async def clients() -> AsyncIterator[list[nats.NATS]]:
    opened: list[nats.NATS] = []
    yield opened
    for nc in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), T)


async def connect(url: str, opened: list[nats.NATS], **kwargs: Any) -> nats.NATS:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=T, **kwargs)
    opened.append(nc)
    return nc


class Raw:
    """A protocol-level client: write bytes, read exact lines and payloads, with timeouts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: dict[str, Any]):
        self.reader, self.writer, self.info = reader, writer, info

    @classmethod
    async def open(cls, server: NatsServer, connect: str | None = '{"verbose":false}') -> Raw:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), T)
        line = await asyncio.wait_for(reader.readline(), T)
        assert line.startswith(b"INFO {") and line.endswith(b"}\r\n"), line
        raw = cls(reader, writer, json.loads(line[5:]))
        if connect is not None:
            await raw.send(b"CONNECT " + connect.encode() + b"\r\n")
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), T)

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), T)

    async def exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), T)

    async def sync(self) -> None:
        """PING and wait for the PONG: everything sent before has been processed."""
        await self.send(b"PING\r\n")
        assert await self.line() == b"PONG\r\n"

    async def until_eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), T)

    def close(self) -> None:
        self.writer.close()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


# -- nats-py ---------------------------------------------------------------------------------


async def test_pub_sub_with_wildcards(server: NatsServer, clients: list[nats.NATS]) -> None:
    nc = await connect(server.url, clients)
    exact = await nc.subscribe("orders.eu.created")
    star = await nc.subscribe("orders.*.created")
    tail = await nc.subscribe("orders.>")
    for subject in (
        "orders.eu.created",
        "orders.us.created",
        "orders.eu.paid.late",
        "orders",
        "other.eu.created",
    ):
        await nc.publish(subject, subject.encode())
    await nc.flush(T)

    async def drain(sub: Any) -> list[str]:
        got = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                got.append((await sub.next_msg(0.2)).subject)
        return got

    assert await drain(exact) == ["orders.eu.created"]
    assert await drain(star) == ["orders.eu.created", "orders.us.created"]
    assert await drain(tail) == ["orders.eu.created", "orders.us.created", "orders.eu.paid.late"]


async def test_queue_groups_get_each_message_once_per_group(
    server: NatsServer, clients: list[nats.NATS]
) -> None:
    received: dict[str, list[bytes]] = {}

    def collector(name: str) -> Callable[[Any], Awaitable[None]]:
        received[name] = []

        async def cb(msg: Any) -> None:
            received[name].append(msg.data)

        return cb

    members = [await connect(server.url, clients) for _ in range(3)]
    for i, nc in enumerate(members):
        await nc.subscribe("jobs", queue="workers", cb=collector(f"workers{i}"))
        await nc.subscribe("jobs", queue="auditors", cb=collector(f"auditors{i}"))
        await nc.flush(T)
    plain = await connect(server.url, clients)
    await plain.subscribe("jobs", cb=collector("plain"))
    await plain.flush(T)
    publisher = await connect(server.url, clients)
    sent = [str(i).encode() for i in range(60)]
    for data in sent:
        await publisher.publish("jobs", data)
    await publisher.flush(T)
    await wait_until(lambda: sum(len(v) for v in received.values()) == 180, "all deliveries")

    assert received["plain"] == sent
    for group in ("workers", "auditors"):
        got = [received[f"{group}{i}"] for i in range(3)]
        assert sorted(d for part in got for d in part) == sorted(sent), group
        assert all(part for part in got), f"every {group} member gets a share: {got}"


async def test_unsubscribe_after_max_messages(server: NatsServer, clients: list[nats.NATS]) -> None:
    nc = await connect(server.url, clients)
    sub = await nc.subscribe("counted")
    await sub.unsubscribe(limit=2)
    for i in range(5):
        await nc.publish("counted", b"%d" % i)
    await nc.flush(T)
    assert [(await sub.next_msg(T)).data for _ in range(2)] == [b"0", b"1"]
    await wait_until(lambda: not server._index.match("counted"), "server dropped the subscription")


async def test_request_reply(server: NatsServer, clients: list[nats.NATS]) -> None:
    responder = await connect(server.url, clients)

    async def double(msg: Any) -> None:
        await msg.respond(msg.data * 2)

    await responder.subscribe("math.double", cb=double)
    await responder.flush(T)
    requester = await connect(server.url, clients)
    reply = await requester.request("math.double", b"ab", timeout=T)
    assert reply.data == b"abab"


async def test_no_responders(server: NatsServer, clients: list[nats.NATS]) -> None:
    nc = await connect(server.url, clients)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("nobody.home", b"?", timeout=T)


async def test_headers_round_trip(server: NatsServer, clients: list[nats.NATS]) -> None:
    nc = await connect(server.url, clients)
    sub = await nc.subscribe("with.headers")
    await nc.publish("with.headers", b"body", headers={"Trace": "abc", "X-Empty-Body": "yes"})
    await nc.publish("with.headers", b"", headers={"Only": "headers"})
    first, second = await sub.next_msg(T), await sub.next_msg(T)
    assert (first.data, first.headers) == (b"body", {"Trace": "abc", "X-Empty-Body": "yes"})
    assert (second.data, second.headers) == (b"", {"Only": "headers"})


async def test_headers_are_stripped_for_a_client_without_header_support(server: NatsServer) -> None:
    old = await Raw.open(server, '{"verbose":false}')
    await old.send(b"SUB h 1\r\n")
    await old.sync()
    new = await Raw.open(server, '{"verbose":false,"headers":true}')
    await new.send(b"HPUB h 12 14\r\nNATS/1.0\r\n\r\nhi\r\n")
    await new.sync()
    assert await old.line() == b"MSG h 1 2\r\n"
    assert await old.exactly(4) == b"hi\r\n"


async def test_max_payload_is_advertised_and_checked_by_nats_py(
    make_server: MakeServer, clients: list[nats.NATS]
) -> None:
    server = await make_server(max_payload=1000)
    nc = await connect(server.url, clients)
    assert nc.max_payload == 1000
    with pytest.raises(nats.errors.MaxPayloadError):
        await nc.publish("big", b"x" * 1001)


async def test_token_auth(make_server: MakeServer, clients: list[nats.NATS]) -> None:
    server = await make_server(token="s3cret")
    nc = await connect(server.url, clients, token="s3cret")
    assert nc.is_connected
    for bad in ({"token": "wrong"}, {}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(server.url, clients, **bad)


async def test_user_password_auth(make_server: MakeServer, clients: list[nats.NATS]) -> None:
    server = await make_server(user="ann", password="pw")
    nc = await connect(server.url, clients, user="ann", password="pw")
    await nc.flush(T)
    for bad in ({"user": "ann", "password": "nope"}, {"user": "bob", "password": "pw"}, {}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(server.url, clients, **bad)


async def test_echo_false_suppresses_own_messages(server: NatsServer, clients: list[nats.NATS]) -> None:
    quiet = await connect(server.url, clients, no_echo=True)
    own = await quiet.subscribe("chat")
    other = await connect(server.url, clients)
    await quiet.flush(T)
    await quiet.publish("chat", b"mine")
    await other.publish("chat", b"theirs")
    await quiet.flush(T)
    await other.flush(T)
    assert (await own.next_msg(T)).data == b"theirs"
    with pytest.raises(nats.errors.TimeoutError):
        await own.next_msg(0.2)


async def test_flush_and_rtt(server: NatsServer, clients: list[nats.NATS]) -> None:
    nc = await connect(server.url, clients)
    await nc.flush(T)
    assert 0 <= await nc.rtt() < T


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the test certificate (the cryptography package is absent)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


async def test_tls(make_server: MakeServer, clients: list[nats.NATS], tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server = await make_server(tls_cert=cert, tls_key=key)
    assert server.url.startswith("tls://")
    context = ssl.create_default_context(cafile=str(cert))
    nc = await connect(server.url, clients, tls=context)
    sub = await nc.subscribe("secure")
    await nc.publish("secure", b"x" * 100_000)
    assert (await sub.next_msg(T)).data == b"x" * 100_000
    (conn,) = server._connections
    assert conn.transport is not None and conn.transport.get_extra_info("ssl_object") is not None

    # A client that sends plain text instead of a TLS handshake is dropped, not served.
    raw = await Raw.open(server, connect=None)
    assert raw.info["tls_required"] is True
    await raw.send(b'CONNECT {"verbose":true}\r\nPING\r\n')
    assert b"PONG" not in await raw.until_eof()
    await nc.flush(T)


# -- the in-process hook -----------------------------------------------------------------------


async def test_internal_subscription_answers_requests_and_sees_publishes(
    server: NatsServer, clients: list[nats.NATS]
) -> None:
    seen: list[Delivery] = []

    def api(delivery: Delivery) -> None:
        seen.append(delivery)
        if delivery.reply is not None:
            server.publish(delivery.reply, b'{"ok":true}', headers=b"NATS/1.0\r\nKind: api\r\n\r\n")

    handle = server.subscribe("$JS.API.>", api)
    capture = server.subscribe("orders.*", seen.append)
    nc = await connect(server.url, clients)
    reply = await nc.request("$JS.API.INFO", b"{}", timeout=T)
    assert (reply.data, reply.headers) == (b'{"ok":true}', {"Kind": "api"})
    # A captured subject has a responder (the capture), so requests to it do not fail fast.
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request("orders.new", b"1", timeout=0.2, headers={"Nats-Msg-Id": "m1"})
    await nc.publish("orders.old", b"2")
    await nc.flush(T)
    assert [(d.subject, d.payload) for d in seen] == [
        ("$JS.API.INFO", b"{}"), ("orders.new", b"1"), ("orders.old", b"2")
    ]  # fmt: skip
    assert seen[1].headers is not None and parse_headers(seen[1].headers)[2] == [("Nats-Msg-Id", "m1")]
    handle.unsubscribe()
    capture.unsubscribe()
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("$JS.API.INFO", b"{}", timeout=T)


async def test_an_internal_wildcard_shares_its_subjects_with_overlapping_subscriptions(
    server: NatsServer, clients: list[nats.NATS]
) -> None:
    # Alone on "$JS.ACK.>", the internal subscription gets its subjects without a route
    # lookup; a client subscription that overlaps it must still see them, and only while it lasts.
    internal: list[str] = []
    server.subscribe("$JS.ACK.>", lambda d: internal.append(d.subject))
    nc = await connect(server.url, clients)
    await nc.publish("$JS.ACK.S.c.1.1.1.0.0", b"")
    await nc.flush(T)
    seen: list[str] = []

    async def watch(msg: Any) -> None:
        seen.append(msg.subject)

    for pattern in ("$JS.ACK.S.>", ">", "*.ACK.*.c.>"):
        watcher = await nc.subscribe(pattern, cb=watch)
        await nc.publish("$JS.ACK.S.c.1.2.2.0.0", pattern.encode())
        await nc.flush(T)
        await wait_until(lambda: len(seen) == 1, f"the {pattern} subscriber gets the ack subject")
        await watcher.unsubscribe()
        seen.clear()
    await nc.publish("$JS.ACK.S.c.1.3.3.0.0", b"")
    await nc.flush(T)
    assert internal == ["$JS.ACK.S.c.1.1.1.0.0"] + ["$JS.ACK.S.c.1.2.2.0.0"] * 3 + ["$JS.ACK.S.c.1.3.3.0.0"]
    assert seen == [], "an unsubscribed client gets nothing more"
    # Two internal subscriptions to the same subjects: neither owns them, both get them.
    twin: list[str] = []
    server.subscribe("$JS.ACK.>", lambda d: twin.append(d.subject))
    await nc.publish("$JS.ACK.S.c.1.4.4.0.0", b"")
    await nc.flush(T)
    assert (internal[-1], twin) == ("$JS.ACK.S.c.1.4.4.0.0", ["$JS.ACK.S.c.1.4.4.0.0"])


# -- raw protocol ------------------------------------------------------------------------------


async def test_info_line(server: NatsServer) -> None:
    raw = await Raw.open(server, connect=None)
    info = raw.info
    assert info["proto"] == 1 and info["headers"] is True
    assert info["max_payload"] == 1024 * 1024 and info["port"] == server.port
    assert isinstance(info["server_id"], str) and isinstance(info["client_id"], int)
    assert "auth_required" not in info and "tls_required" not in info
    raw.close()


async def test_verbose_acknowledges_each_operation(server: NatsServer) -> None:
    raw = await Raw.open(server, '{"verbose":true}')
    assert await raw.line() == b"+OK\r\n"
    await raw.send(b"SUB v 1\r\nPUB v 2\r\nhi\r\nUNSUB 1\r\n")
    assert [await raw.line() for _ in range(2)] == [b"+OK\r\n", b"+OK\r\n"]
    assert await raw.line() == b"MSG v 1 2\r\n"
    assert await raw.exactly(4) == b"hi\r\n"
    assert await raw.line() == b"+OK\r\n"
    await raw.sync()


async def test_ping_pong_case_insensitive(server: NatsServer) -> None:
    raw = await Raw.open(server, connect=None)
    await raw.send(b"ping\r\nPiNg\n")
    assert [await raw.line(), await raw.line()] == [b"PONG\r\n", b"PONG\r\n"]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"FOO bar\r\n", "Unknown Protocol Operation"),
        (b"\x00\x01\xff\xfe\r\n", "Unknown Protocol Operation"),
        (b"PUB foo 2\r\nhiXX\r\n", "Unknown Protocol Operation"),
        (b"PUB foo 2000\r\n", "Maximum Payload Violation"),
        (b"PUB foo x\r\n", "Parser Error"),
        (b"PUB foo -1\r\n", "Parser Error"),
        (b"PUB foo\r\n", "Parser Error"),
        (b"PUB foo a b 2\r\n", "Parser Error"),
        (b"SUB foo\r\n", "Parser Error"),
        (b"UNSUB 1 x\r\n", "Parser Error"),
        (b"CONNECT {nope\r\n", "Parser Error"),
        (b"HPUB foo 12 14\r\nNATS/1.0\r\n\r\nhi\r\n", "Parser Error"),  # headers not announced
        (b"PUB " + b"x" * 5000 + b" 1\r\n", "Maximum Control Line Exceeded"),
        (b"SUB " + b"y" * 5000, "Maximum Control Line Exceeded"),
    ],
)
async def test_malformed_input_gets_err_and_close(make_server: MakeServer, data: bytes, error: str) -> None:
    server = await make_server(max_payload=1024)
    raw = await Raw.open(server)
    await raw.send(data)
    assert await raw.until_eof() == b"-ERR '%b'\r\n" % error.encode()
    await wait_until(lambda: server.connection_count == 0, "connection closed")
    # The server is still fine.
    other = await Raw.open(server)
    await other.sync()


async def test_invalid_subjects_are_refused_without_closing(server: NatsServer) -> None:
    raw = await Raw.open(server, '{"verbose":false,"pedantic":true}')
    await raw.send(b"SUB foo..bar 1\r\nSUB a.>.b 2\r\nPUB foo.* 1\r\nx\r\n")
    assert [await raw.line() for _ in range(3)] == [
        b"-ERR 'Invalid Subject'\r\n", b"-ERR 'Invalid Subject'\r\n", b"-ERR 'Invalid Publish Subject'\r\n"
    ]  # fmt: skip
    await raw.sync()
    lax = await Raw.open(server, '{"verbose":false,"pedantic":false}')
    await lax.send(b"PUB foo.* 1\r\nx\r\n")
    await lax.sync()  # not pedantic: dropped without a word


async def test_frames_split_at_every_byte_are_delivered_once(server: NatsServer) -> None:
    sub = await Raw.open(server, '{"verbose":false,"headers":true}')
    await sub.send(b"SUB split.* 7\r\n")
    await sub.sync()
    pub = await Raw.open(server, '{"verbose":false,"headers":true}')
    pub.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = b"PUB split.a r.1 5\r\nhello\r\nHPUB split.b 18 20\r\nNATS/1.0\r\nK: v\r\n\r\nok\r\n"
    for cut in range(1, len(frame)):
        await pub.send(frame[:cut])
        await asyncio.sleep(0.001)
        await pub.send(frame[cut:])
    await pub.sync()
    for _ in range(1, len(frame)):
        assert await sub.line() == b"MSG split.a 7 r.1 5\r\n"
        assert await sub.exactly(7) == b"hello\r\n"
        assert await sub.line() == b"HMSG split.b 7 18 20\r\n"
        assert await sub.exactly(22) == b"NATS/1.0\r\nK: v\r\n\r\nok\r\n"
    await sub.sync()  # nothing else was queued before the PONG


async def test_commands_before_connect_need_auth(make_server: MakeServer) -> None:
    server = await make_server(token="t")
    raw = await Raw.open(server, connect=None)
    assert raw.info["auth_required"] is True
    await raw.send(b"SUB x 1\r\n")
    assert await raw.until_eof() == b"-ERR 'Authorization Violation'\r\n"


async def test_auth_timeout_closes_a_silent_client(make_server: MakeServer) -> None:
    server = await make_server(token="t", auth_timeout_s=0.2)
    raw = await Raw.open(server, connect=None)
    assert await raw.until_eof() == b"-ERR 'Authentication Timeout'\r\n"


async def test_server_pings_and_drops_stale_connections(make_server: MakeServer) -> None:
    server = await make_server(ping_interval_s=0.1, max_pings_out=2)
    alive = await Raw.open(server)
    pings = 0

    async def answer() -> None:
        nonlocal pings
        while await alive.line() == b"PING\r\n":
            pings += 1
            await alive.send(b"PONG\r\n")

    answering = asyncio.create_task(answer())
    silent = await Raw.open(server)
    assert await silent.until_eof() == b"PING\r\nPING\r\n-ERR 'Stale Connection'\r\n"
    # Answering keeps the other connection up well past the stale limit (3 intervals).
    await wait_until(lambda: pings >= 5, "PINGs keep coming")
    assert not answering.done() and server.connection_count == 1
    answering.cancel()


async def test_client_stalled_mid_payload_blocks_no_one(
    make_server: MakeServer, clients: list[nats.NATS]
) -> None:
    server = await make_server(ping_interval_s=0.2, max_pings_out=1)
    stalled = await Raw.open(server)
    await stalled.send(b"PUB stuck 100\r\nonly part of it")
    nc = await connect(server.url, clients)
    sub = await nc.subscribe("free")
    await nc.publish("free", b"flows")
    assert (await sub.next_msg(T)).data == b"flows"
    # PONGs from the stalled client would be read as payload, so staleness ends it.
    assert (await stalled.until_eof()).endswith(b"-ERR 'Stale Connection'\r\n")
    await nc.flush(T)


async def test_slow_consumer_is_cut_off_and_others_keep_working(
    make_server: MakeServer, clients: list[nats.NATS]
) -> None:
    server = await make_server(max_pending_bytes=256 * 1024, max_payload=64 * 1024)
    # A small receive buffer so that the kernel does not soak up the backlog for the client.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port)), T)
    reader, writer = await asyncio.open_connection(sock=sock)
    slow = Raw(reader, writer, json.loads((await asyncio.wait_for(reader.readline(), T))[5:]))
    await slow.send(b'CONNECT {"verbose":false,"name":"slow"}\r\nSUB flood 1\r\n')
    await slow.sync()

    publisher = await connect(server.url, clients)
    bystander = await connect(server.url, clients)
    watch = await bystander.subscribe("ok")
    await bystander.flush(T)
    chunk = b"z" * 32 * 1024
    for _ in range(400):  # 12.5 MiB, far beyond what the socket buffers hold
        await publisher.publish("flood", chunk)
    await publisher.flush(T)
    await wait_until(lambda: server.slow_consumers == 1, "slow consumer detected")

    await publisher.publish("ok", b"still here")
    assert (await watch.next_msg(T)).data == b"still here"
    await bystander.flush(T)
    received = await slow.until_eof()  # the server closed it: the read ends
    assert len(received) < 400 * len(chunk)
    assert server.connection_count == 2


async def test_stop_closes_clients(make_server: MakeServer) -> None:
    server = await make_server()
    raw = await Raw.open(server)
    await raw.sync()
    await server.stop()
    assert await raw.until_eof() == b""
    await server.stop()  # twice is fine


def test_options_are_checked() -> None:
    with pytest.raises(InvalidConfigError, match="either token or user"):
        ServerOptions(token="t", user="u", password="p")
    with pytest.raises(InvalidConfigError, match="together"):
        ServerOptions(user="u")
    with pytest.raises(InvalidConfigError, match="max_pending_bytes"):
        ServerOptions(max_pending_bytes=10, max_payload=100)
    with pytest.raises(InvalidConfigError, match="port"):
        ServerOptions(port=70000)
    assert ServerOptions().port == 4333
