"""A client process for the `pigeon serve` crash test; runs until it is killed.

    python serve_load_worker.py publish URL SUBJECT OUT NAME
    python serve_load_worker.py consume URL STREAM DURABLE OUT

A publisher sends messages whose payload (and Nats-Msg-Id) is ``NAME-i`` and appends
``NAME-i SEQ`` to OUT, fsynced, once the PubAck came back. A consumer pulls from the durable
consumer, appends ``try ID`` before acking and ``ack ID`` once the server confirmed the ack:
an id with a ``try`` and no ``ack`` may or may not have been acked when the server died.
Errors while the server is down are waited out; the process never exits by itself.
"""

from __future__ import annotations

import asyncio
import os
import sys

import nats
import nats.errors


def _append(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())
    os.fsync(fd)


async def _quiet(error: Exception) -> None:
    """Connection errors are expected here: the server is killed on purpose."""


async def _connect(url: str) -> nats.NATS:
    while True:
        try:
            return await nats.connect(
                url,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,
                connect_timeout=1,
                error_cb=_quiet,
            )
        except Exception:
            await asyncio.sleep(0.1)


async def publish(url: str, subject: str, out: str, name: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    nc = await _connect(url)
    js = nc.jetstream(timeout=1)
    i = 0
    while True:
        i += 1
        msg_id = f"{name}-{i}"
        try:
            ack = await js.publish(subject, msg_id.encode(), headers={"Nats-Msg-Id": msg_id})
        except Exception:
            await asyncio.sleep(0.05)
            continue
        _append(fd, f"{msg_id} {ack.seq}")


async def consume(url: str, stream: str, durable: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    nc = await _connect(url)
    js = nc.jetstream(timeout=1)
    while True:
        try:
            sub = await js.pull_subscribe_bind(durable, stream)
            break
        except Exception:
            await asyncio.sleep(0.1)
    while True:
        try:
            msgs = await sub.fetch(20, timeout=0.5)
        except Exception:
            await asyncio.sleep(0.05)
            continue
        for msg in msgs:
            msg_id = msg.data.decode()
            _append(fd, f"try {msg_id}")
            try:
                await msg.ack_sync(timeout=1)
            except Exception:
                continue
            _append(fd, f"ack {msg_id}")


def main() -> None:
    role, *args = sys.argv[1:]
    asyncio.run(publish(*args) if role == "publish" else consume(*args))


if __name__ == "__main__":
    main()
