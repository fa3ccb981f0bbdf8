"""Crash-test worker for the outbox relay (``tests/test_outbox.py`` kills it with SIGKILL).

    python tests/outbox_relay_worker.py DATABASE_URL TABLE BROKER_DIR [--max-seconds N]

Opens the embedded broker on ``BROKER_DIR`` with ``durability="always"`` (every
acknowledged publish is on disk), creates the stream ``outbox`` capturing ``outbox.>`` (a
no-op after the first start), prints ``ready`` and relays the outbox table ``TABLE`` of
``DATABASE_URL`` in small batches until it is killed. The name does not match
``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from pigeon.patterns.outbox import Outbox, OutboxRelay
from pigeon.transport import StreamSpec, connect
from pigeon.transport.embedded import EmbeddedOptions

STREAM = "outbox"
SUBJECTS = ("outbox.>",)
BATCH_SIZE = 20


def _fail(message: str) -> None:
    os.write(2, f"outbox_relay_worker: {message}\n".encode())
    os._exit(5)


async def main(args: argparse.Namespace) -> None:
    # A safety net if the parent died: the worker is meant to be killed, never to finish.
    asyncio.get_running_loop().call_later(args.max_seconds, _fail, f"not killed within {args.max_seconds} s")
    transport = await connect(f"file://{args.broker}", EmbeddedOptions(durability="always"))
    await transport.create_stream(StreamSpec(STREAM, SUBJECTS))
    outbox = Outbox.from_url(args.database, table=args.table)
    relay = OutboxRelay(outbox, transport, batch_size=BATCH_SIZE, poll_interval_s=0.01, max_backoff_s=0.05)
    os.write(1, b"ready\n")
    await relay.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="outbox relay, killed by its parent")
    parser.add_argument("database")
    parser.add_argument("table")
    parser.add_argument("broker")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    asyncio.run(main(parser.parse_args()))
