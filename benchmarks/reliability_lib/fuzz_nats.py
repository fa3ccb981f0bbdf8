"""Fuzzing `pigeon serve`'s NATS port over real sockets.

Each example is one connection sending frames, most valid (CONNECT, PING, SUB, UNSUB, PUB and
HPUB, many of them requests to ``$JS.API`` and ``$PIGEON.API`` with generated JSON bodies),
some mutated (bytes flipped, inserted, cut, length fields changed) or pure garbage, cut into
random chunks, then a PING. The server may answer, say ``-ERR`` or close; after every example
a fresh connection must still get a PONG, and the server process must still run.
"""

from __future__ import annotations

import json
import random
import socket
import time

from .common import Report

API = [
    "$JS.API.INFO", "$JS.API.STREAM.CREATE.fz", "$JS.API.STREAM.INFO.orders", "$JS.API.STREAM.UPDATE.orders",
    "$JS.API.STREAM.DELETE.fz", "$JS.API.STREAM.PURGE.fz", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.MSG.GET.orders", "$JS.API.CONSUMER.CREATE.orders",
    "$JS.API.CONSUMER.DURABLE.CREATE.orders.c", "$JS.API.CONSUMER.INFO.orders.c",
    "$JS.API.CONSUMER.MSG.NEXT.orders.c", "$JS.API.CONSUMER.DELETE.orders.c",
    "$JS.API.DIRECT.GET.orders", "$PIGEON.API.INFO", "$PIGEON.API.STREAM.CREATE", "$PIGEON.API.STREAM.STATE",
    "$PIGEON.API.STREAM.PURGE", "$PIGEON.API.STREAM.LIST", "$PIGEON.API.PUBLISH", "$PIGEON.API.PUB",
    "$PIGEON.API.GROUP.JOIN", "$PIGEON.API.GROUP.FETCH", "$PIGEON.API.ACK", "$PIGEON.API.GROUP.LAG",
    "$PIGEON.API.GROUP.DEAD_LETTERS", "$PIGEON.API.GROUP.DELETE", "$PIGEON.API.GROUP.LEAVE",
]  # fmt: skip
FIELDS = [
    "name", "subjects", "partitions", "stream", "spec", "member", "group", "kind", "batch", "expires_s",
    "partition", "offset", "op", "delay", "max_msgs", "max_bytes", "max_age", "durable_name", "config",
    "deliver_policy", "ack_policy", "opt_start_seq", "seq", "last_by_subj", "no_wait", "expires", "start",
]  # fmt: skip
SUBJECTS = ["orders.new", "fz.a", "a.*", ">", "a..b", "", "_INBOX.x", "$JS.ACK.orders.c.1.1.1.1.0", *API]


def _value(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**70), 3, 1000])
    if choice == 3:
        return rng.choice([0.5, -1.5, 1e308, 1e-9])
    if choice in (4, 5):
        return rng.choice(["orders", "fz", "ordered", "shared", "ack", "all", "", "x" * 300, "ä", "orders.>"])
    if choice == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(FIELDS): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _frame(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        options = {"verbose": rng.random() < 0.3, "pedantic": rng.random() < 0.3, "headers": True}
        return b"CONNECT " + json.dumps(options).encode() + b"\r\n"
    if kind == 1:
        return rng.choice([b"PING\r\n", b"PONG\r\n"])
    if kind == 2:
        return f"SUB {rng.choice(SUBJECTS)} {rng.choice(['', 'q '])}{rng.randrange(5)}\r\n".encode()
    if kind == 3:
        return f"UNSUB {rng.randrange(5)} {rng.choice(['', '1'])}\r\n".encode()
    subject = rng.choice(SUBJECTS)
    body = json.dumps(_value(rng)).encode() if rng.random() < 0.8 else rng.randbytes(rng.randrange(20))
    reply = "_INBOX.fz " if rng.random() < 0.8 else ""
    if kind == 4:
        return f"PUB {subject} {reply}{len(body)}\r\n".encode() + body + b"\r\n"
    name = rng.choice(["Nats-Msg-Id", "Nats-Expected-Last-Sequence", "Pigeon-Subject", "Pigeon-Key", "X"])
    headers = f"NATS/1.0\r\n{name}: {_value(rng)}\r\n\r\n".encode()
    return (
        f"HPUB {subject} {reply}{len(headers)} {len(headers) + len(body)}\r\n".encode()
        + headers
        + body
        + b"\r\n"
    )


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(b) + 1)
        action = rng.randrange(5)
        if action == 0 and b:
            b[min(where, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif action == 1:
            b[where:where] = rng.randbytes(rng.randint(1, 8))
        elif action == 2:
            del b[where : where + rng.randint(1, 8)]
        elif action == 3:
            b[where:where] = str(rng.choice([0, -1, 10**12, 2**64, 1048577])).encode()
        else:
            b = b[:where]
    return bytes(b)


def _example(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return rng.randbytes(rng.randrange(1, 200))
    frames = [_frame(rng) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.7:
        frames.insert(0, b'CONNECT {"headers": true, "verbose": false}\r\nSUB _INBOX.fz 99\r\n')
    if rng.random() < 0.5:
        i = rng.randrange(len(frames))
        frames[i] = _mutate(rng, frames[i])
    return b"".join(frames) + b"PING\r\n"


def _send(port: int, data: bytes, rng: random.Random) -> str:
    """Send ``data`` in random chunks; how the server reacted: pong, err, closed or silent."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(4096)  # INFO
        with_pong = b""
        try:
            while data:
                cut = rng.randint(1, len(data))
                s.sendall(data[:cut])
                data = data[cut:]
            s.settimeout(0.3)
            while chunk := s.recv(65536):
                with_pong += chunk
                if b"PONG" in with_pong:
                    return "pong"
        except TimeoutError:
            return "err" if b"-ERR" in with_pong else "silent"
        except OSError:
            pass  # reset while sending: the server closed on an error
        return "err" if b"-ERR" in with_pong else "closed"


def alive(port: int, timeout: float = 5.0) -> bool:
    """A fresh client gets through: CONNECT, a publish, and a PONG back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.recv(4096)
            s.sendall(b'CONNECT {"verbose": false}\r\nPUB fz.alive 2\r\nok\r\nPING\r\n')
            got = b""
            deadline = time.monotonic() + timeout
            while b"PONG" not in got and time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                got += chunk
            return b"PONG" in got
    except OSError:
        return False


def run(port: int, examples: int, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for i in range(examples):
        data = _example(rng)
        try:
            outcome = _send(port, data, rng)
        except OSError as error:
            outcome = f"connect failed: {error}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if not alive(port):
            report.fail(f"NATS port unresponsive after example {i} (seed {seed}): {data[:300]!r}")
            break
    report.figures["nats_examples"] = sum(outcomes.values())
    report.figures["nats_outcomes"] = outcomes
