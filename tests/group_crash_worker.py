"""Crash-test worker for consumer groups: one process that publishes and consumes until killed.

Run as a script (by ``tests/test_groups_crash.py``)::

    python tests/group_crash_worker.py DATA_DIR LOG_DIR --seed S --cycle C
        --role mixed|publish|consume|drain --durability always|interval

It opens the engine on ``DATA_DIR`` (recovering whatever the previous, SIGKILLed worker left),
creates the stream and the groups (no-ops after the first cycle), prints ``ready`` on stdout
and then, by its role, publishes and/or consumes until it is killed. Only one process may own
a data folder, so the publisher and every consumer are tasks of this one process.

Everything it observes is appended to files in ``LOG_DIR`` (opened with ``O_APPEND``; every
line is one ``os.write`` followed by ``os.fsync``, so a line that was written survives the
kill, and a line cut by it has no newline and is ignored by the checker):

* ``published.log``: ``partition offset payload`` once a publish call *returned*.
* ``<group>.log``: ``group partition offset payload`` when a consumer processes a message,
  written *before* it settles it, and ``ACKED partition offset`` once its ack *returned*.

The groups (see `GROUPS`): a shared group with a pull member (acks one by one or with
``ack_batch``) and a push member (`pigeon.engine.groups.push.consume`), an ordered group in
commit mode ``message`` with two members acking one by one (an ack returned == committed),
and an ordered group in commit mode ``batch`` whose member acknowledges each fetched batch
with ``ack_batch`` (that commits it, so there too an ack returned == committed). Consumers
nack a few messages (redelivered at once) to exercise rewinds and redelivery.

The ``drain`` role publishes nothing, consumes until every group's lag is 0, closes the
engine and prints ``drained {json of the lags}``; it is the only role that exits by itself.

Every payload is unique: ``c<cycle>.s<seq>.<filler>``. The file has no ``test_`` function and
its name does not match ``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from pigeon.engine import Engine, OrderedGroupConfig, SharedGroupConfig, StreamConfig
from pigeon.engine.groups import statelog
from pigeon.engine.groups.delivery import Delivery
from pigeon.engine.groups.push import consume
from pigeon.errors import DeliveryNotOwnedError

STREAM = "gcrash"
PARTITIONS = 3
SUBJECT = "gcrash.events"
SEGMENT_BYTES = 32 * 1024
SHARED = "shared"
ORDERED = "ordered"  # commit="message"
ORDERED_BATCH = "ordered-batch"  # commit="batch", acknowledged with ack_batch
GROUPS = (SHARED, ORDERED, ORDERED_BATCH)
ORDERED_GROUPS = (ORDERED, ORDERED_BATCH)
NACK_PROBABILITY = 0.03
WORKER = Path(__file__).resolve()


def stream_config(durability: str) -> StreamConfig:
    return StreamConfig(
        STREAM,
        ("gcrash.>",),
        partitions=PARTITIONS,
        durability=durability,  # type: ignore[arg-type]
        fsync_interval_ms=20,
        segment_bytes=SEGMENT_BYTES,
    )


def shared_config() -> SharedGroupConfig:
    # ack_wait is short enough that a stalled consumer sometimes loses a lease mid-cycle.
    return SharedGroupConfig(SHARED, ack_wait_s=2.0, max_ack_pending=200)


def ordered_config(name: str) -> OrderedGroupConfig:
    commit = "message" if name == ORDERED else "batch"
    return OrderedGroupConfig(name, commit=commit, session_timeout_s=30.0, heartbeat_interval_s=1.0)  # type: ignore[arg-type]


# -- the logs ------------------------------------------------------------------------------------


class AppendLog:
    """A file of lines, each appended with one write and fsynced before returning."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, lines: Sequence[str]) -> None:
        data = "".join(lines).encode()
        while data:  # a regular file: one write in practice, but be correct about short ones
            data = data[os.write(self.fd, data) :]
        os.fsync(self.fd)


class GroupLog(AppendLog):
    def __init__(self, directory: Path, group: str) -> None:
        super().__init__(directory / f"{group}.log")
        self.group = group

    def processed(self, deliveries: Sequence[Delivery]) -> None:
        self.write(
            [f"{self.group} {d.partition} {d.offset} {d.message.payload.decode()}\n" for d in deliveries]
        )

    def acked(self, deliveries: Sequence[Delivery]) -> None:
        self.write([f"ACKED {d.partition} {d.offset}\n" for d in deliveries])


def _emit(text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(1, data) :]


def _fail(message: str) -> None:
    os.write(2, f"group_crash_worker: {message}\n".encode())
    os._exit(5)


# -- publishing ----------------------------------------------------------------------------------


async def publisher(engine: Engine, log: AppendLog, seed: int, cycle: int, rate: float) -> None:
    """Keyed messages, one by one or in ``publish_many`` batches, at about ``rate`` per second."""
    rnd = random.Random(f"{seed}/{cycle}/publisher")
    seq = 0
    while True:
        if rnd.random() < 0.25:
            count = rnd.randint(2, 12)
            payloads = [_payload(rnd, cycle, seq + i) for i in range(count)]
            seq += count
            acks = await engine.publish_many(SUBJECT, payloads, key=f"k{rnd.randrange(16)}")
            log.write(
                [f"{a.partition} {a.offset} {p.decode()}\n" for a, p in zip(acks, payloads, strict=True)]
            )
        else:
            count = 1
            payload = _payload(rnd, cycle, seq)
            seq += 1
            ack = await engine.publish(SUBJECT, payload, key=f"k{rnd.randrange(16)}")
            log.write([f"{ack.partition} {ack.offset} {payload.decode()}\n"])
        await asyncio.sleep(rnd.expovariate(rate / count))


def _payload(rnd: random.Random, cycle: int, seq: int) -> bytes:
    return f"c{cycle}.s{seq}.".encode() + rnd.randbytes(rnd.randrange(0, 60)).hex().encode()


# -- consuming -----------------------------------------------------------------------------------


def _nack_now(rnd: random.Random) -> bool:
    return rnd.random() < NACK_PROBABILITY


async def shared_pull(engine: Engine, log: GroupLog, rnd: random.Random, stop: asyncio.Event) -> None:
    member = (await engine.shared_group(STREAM, shared_config())).member("pull")
    while not stop.is_set():
        deliveries = await member.fetch(rnd.randint(1, 40), 0.2)
        if rnd.random() < 0.3:  # process them all, then one ack_batch
            todo = [d for d in deliveries if not d.cancelled.is_set()]
            if todo:
                log.processed(todo)
                with contextlib.suppress(DeliveryNotOwnedError):
                    await member.ack_batch(todo)
                    log.acked(todo)
        else:
            for d in deliveries:
                if d.cancelled.is_set():
                    continue
                log.processed([d])
                with contextlib.suppress(DeliveryNotOwnedError):
                    if _nack_now(rnd):
                        await d.nack(0)
                        continue
                    await d.ack()
                    log.acked([d])
        await asyncio.sleep(0)


async def shared_push(engine: Engine, log: GroupLog, rnd: random.Random, stop: asyncio.Event) -> None:
    member = (await engine.shared_group(STREAM, shared_config())).member("push")

    async def handler(d: Delivery) -> None:
        log.processed([d])
        if _nack_now(rnd):
            await d.nack(0)
            return
        await d.ack()  # DeliveryNotOwnedError: push logs it and moves on
        log.acked([d])

    await consume(member, handler, max_outstanding=rnd.randint(1, 32), stop=stop, poll_s=0.2)


async def ordered_pull(
    engine: Engine, log: GroupLog, member_name: str, rnd: random.Random, stop: asyncio.Event
) -> None:
    member = await (await engine.ordered_group(STREAM, ordered_config(ORDERED))).join(member_name)
    while not stop.is_set():
        # A fetch returns one batch per partition, in order. A partition whose batch is cut
        # short (revoked, or rewound by a nack) is delivered again from there; the batches of
        # the other partitions must still be settled, or those partitions would wait forever.
        given_up: set[int] = set()
        for d in await member.fetch(rnd.randint(1, 40), 0.2):
            if d.partition in given_up or d.cancelled.is_set():
                given_up.add(d.partition)
                continue
            log.processed([d])
            try:
                if _nack_now(rnd):
                    await d.nack(0)
                    given_up.add(d.partition)
                    continue
                await d.ack()
            except DeliveryNotOwnedError:
                given_up.add(d.partition)
                continue
            log.acked([d])
        await asyncio.sleep(0)


async def ordered_batches(engine: Engine, log: GroupLog, rnd: random.Random, stop: asyncio.Event) -> None:
    member = await (await engine.ordered_group(STREAM, ordered_config(ORDERED_BATCH))).join("batch")
    while not stop.is_set():
        deliveries = await member.fetch(rnd.randint(1, 60), 0.2)
        if deliveries:
            # Every fetched delivery is acknowledged together: each partition's batch is then
            # complete, and commit="batch" commits it before ack_batch returns.
            log.processed(deliveries)
            await asyncio.sleep(rnd.uniform(0, 0.02))  # the work: a window for kills before the commit
            await member.ack_batch(deliveries)
            log.acked(deliveries)
        await asyncio.sleep(0)


async def wait_drained(engine: Engine) -> dict[str, list[int]]:
    while True:
        lags = {g: [lag.lag for lag in engine.group_lag(STREAM, g)] for g in GROUPS}
        if not any(any(v) for v in lags.values()):
            return lags
        await asyncio.sleep(0.05)


# -- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    # A safety net if the parent died: a worker is meant to be killed (or to finish draining).
    loop.call_later(args.max_seconds, _fail, f"still running after {args.max_seconds} s")
    if args.compact_every is not None:  # snapshots (and kills in the middle of them) happen often
        if not hasattr(statelog, "_COMPACT_EVERY"):
            _fail("pigeon.engine.groups.statelog._COMPACT_EVERY is gone: update --compact-every")
        statelog._COMPACT_EVERY = args.compact_every
    engine = await Engine.open(args.data)
    await engine.create_stream(stream_config(args.durability))
    await engine.shared_group(STREAM, shared_config())
    for name in ORDERED_GROUPS:
        await engine.ordered_group(STREAM, ordered_config(name))
    _emit("ready\n")
    logs = Path(args.logs)
    group_logs = {g: GroupLog(logs, g) for g in GROUPS}
    rnd = {n: random.Random(f"{args.seed}/{args.cycle}/{n}") for n in ("pull", "push", "o1", "o2", "b")}
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    if args.role in ("mixed", "publish"):
        published = AppendLog(logs / "published.log")
        tasks.append(loop.create_task(publisher(engine, published, args.seed, args.cycle, args.rate)))
    if args.role in ("mixed", "consume", "drain"):
        tasks += [
            loop.create_task(shared_pull(engine, group_logs[SHARED], rnd["pull"], stop)),
            loop.create_task(shared_push(engine, group_logs[SHARED], rnd["push"], stop)),
            loop.create_task(ordered_pull(engine, group_logs[ORDERED], "o1", rnd["o1"], stop)),
            loop.create_task(ordered_pull(engine, group_logs[ORDERED], "o2", rnd["o2"], stop)),
            loop.create_task(ordered_batches(engine, group_logs[ORDERED_BATCH], rnd["b"], stop)),
        ]
    if args.role != "drain":
        await asyncio.gather(*tasks)  # until killed (or until a task fails: the parent reports it)
        return
    drained = loop.create_task(wait_drained(engine))
    done, _ = await asyncio.wait([drained, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if drained not in done:
        for task in done:
            task.result()  # a consumer failed: raise its error
    lags = drained.result()
    # Stopped by a flag, not by cancelling: on Python 3.11 a fetch cancelled just as it is
    # woken swallows the cancellation (asyncio.wait_for in GroupBase._wait), so the loop would
    # go on. Each loop ends within its fetch timeout.
    stop.set()
    await asyncio.gather(*tasks)
    await engine.close()
    _emit(f"drained {json.dumps(lags)}\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pigeon consumer-group crash worker (killed by its parent)")
    parser.add_argument("data")
    parser.add_argument("logs")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--cycle", type=int, required=True)
    parser.add_argument("--role", choices=("mixed", "publish", "consume", "drain"), required=True)
    parser.add_argument("--durability", choices=("always", "interval"), required=True)
    parser.add_argument("--rate", type=float, default=400.0, help="messages published per second")
    parser.add_argument("--compact-every", type=int, help="events per state snapshot")
    parser.add_argument("--max-seconds", type=float, default=90.0)
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
