"""A client process of the crash campaign (`crash`); it runs until it is killed.

    python -m reliability_lib.crash_worker publish URL LOG NAME SEED
    python -m reliability_lib.crash_worker consume URL LOG ordered|shared MEMBER

Lines appended to LOG (see `common.Appender`), with ``time.monotonic_ns()`` stamps, which
every process on the machine shares:

- a publisher: ``p STAMP ID PARTITION OFFSET DUPLICATE`` once the server acknowledged the
  publish of message ``ID`` (payload `common.payload_for`). A publish that failed is retried
  with the same ids, so deduplication must store it once.
- a consumer: ``d FETCH_STARTED PARTITION OFFSET ID INTACT COUNT`` for every delivery, stamped
  with the moment the fetch that returned it was *sent*, and ``a CONFIRMED PARTITION OFFSET``
  once its ack is known durable. For a shared group that is when ``ack()`` returned. An ordered
  group commits per batch (pigeon's default ``commit="batch"``; an acked message of a batch not
  wholly settled is delivered again after a crash, by design), so its acks are confirmed
  when every message the fetch returned for that partition has been acked.

Any error (the server is killed on purpose) drops the connection and starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from pigeon.message import Message
from pigeon.transport import ConsumerSpec, Received, Transport, connect
from pigeon.transport.nats import NatsOptions

from .common import Appender, payload_for, payload_ok

STREAM = "reliability"
SUBJECT = "rel.orders"
PARTITIONS = 3
OPTIONS = NatsOptions(connect_timeout_s=1.0, request_timeout_s=2.0, reconnect_wait_s=0.1)


async def _session(url: str) -> Transport:
    while True:
        try:
            return await connect(url, OPTIONS)
        except Exception:
            await asyncio.sleep(0.1)


def _message(msg_id: str, rng: random.Random) -> Message:
    key = f"k{rng.randrange(16)}" if rng.random() < 0.5 else None
    return Message(SUBJECT, payload_for(msg_id), key=key, id=msg_id)


async def publish(url: str, log: Appender, name: str, seed: int) -> None:
    rng = random.Random(seed)
    sequence = 0
    pending: list[Message] = []
    while True:
        transport = await _session(url)
        try:
            while True:
                if not pending:
                    # Mostly single publishes, sometimes a batch (one request, several partitions).
                    count = 1 if rng.random() < 0.8 else rng.randint(2, 8)
                    for _ in range(count):
                        sequence += 1
                        pending.append(_message(f"{name}-{sequence}", rng))
                if len(pending) == 1:
                    m = pending[0]
                    acks = [await transport.publish(m.subject, m.payload, key=m.key, msg_id=m.id)]
                else:
                    acks = await transport.publish_batch(pending)
                stamp = time.monotonic_ns()
                for m, ack in zip(pending, acks, strict=True):
                    assert ack is not None, "the stream captures every campaign subject"
                    log.line("p", stamp, m.id, ack.partition, ack.offset, int(ack.duplicate))
                pending = []
        except Exception:
            with contextlib.suppress(Exception):
                await transport.close()
            await asyncio.sleep(0.05)


async def _settle(kind: str, log: Appender, received: list[Received]) -> None:
    confirmed: dict[int, list[int]] = defaultdict(list)
    failed: set[int] = set()
    for r in received:
        try:
            await r.ack()
        except Exception:
            failed.add(r.partition)
            if kind == "ordered":
                continue  # the rest of the batch is cancelled too; it comes again
            raise
        if kind == "shared":
            log.line("a", time.monotonic_ns(), r.partition, r.offset)
        else:
            confirmed[r.partition].append(r.offset)
    stamp = time.monotonic_ns()
    for partition, offsets in confirmed.items():
        if partition not in failed:
            for offset in offsets:
                log.line("a", stamp, partition, offset)


async def consume(url: str, log: Appender, kind: str, member: str) -> None:
    # A long lease: within a run nothing is redelivered for lack of an ack, so a second
    # delivery of an acked message can only come from a lost ack.
    spec = ConsumerSpec(kind, kind="ordered" if kind == "ordered" else "shared", ack_wait_s=120.0)
    while True:
        transport = await _session(url)
        try:
            consumer = await transport.consumer(STREAM, spec, member=member)
            while True:
                started = time.monotonic_ns()
                received = list(await consumer.fetch(50, 1.0))
                for r in received:
                    m = r.message
                    log.line(
                        "d",
                        started,
                        r.partition,
                        r.offset,
                        m.id,
                        int(payload_ok(m.id, m.payload)),
                        r.delivery_count,
                    )
                await _settle(kind, log, received)
        except Exception:
            with contextlib.suppress(Exception):
                await transport.close()
            await asyncio.sleep(0.05)


def main() -> None:
    role, url, log_path, *rest = sys.argv[1:]
    log = Appender(Path(log_path))
    if role == "publish":
        asyncio.run(publish(url, log, rest[0], int(rest[1])))
    else:
        asyncio.run(consume(url, log, rest[0], rest[1]))


if __name__ == "__main__":
    main()
