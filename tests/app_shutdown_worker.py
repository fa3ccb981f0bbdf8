"""Shutdown worker: an App processing a stream until SIGTERM or SIGINT stops it.

Run as a script (by ``tests/test_app_shutdown.py``)::

    python tests/app_shutdown_worker.py DATA_DIR LOG_FILE [--stuck PAYLOAD] [--shutdown-timeout S]

It opens the embedded broker in ``DATA_DIR`` (the test created the stream `STREAM` there with
durability ``always`` and published to it) and runs `App.run`. Its handler sleeps a little,
then appends the payload to ``LOG_FILE`` (one ``os.write`` of a whole line, then
``os.fsync``) and returns, so the App acknowledges a message only after it is recorded. The
``--stuck`` payload sleeps far longer than the shutdown deadline, so the shutdown has to
cancel it. The process exits 0 once the App has shut down.

The test imports `subscribe` to join the same group with the same settings afterwards. The
file name does not match ``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from pigeon.app import App, Flow
from pigeon.transport import connect
from pigeon.transport.embedded import EmbeddedOptions

STREAM = "work"
GROUP = "workers"
WORK_S = 0.05


def subscribe(app: App, handler: Any) -> None:
    app.subscriber(stream=STREAM, group=GROUP, ack_wait_s=30, flow=Flow(concurrency=2, max_in_flight=8))(
        handler
    )


async def main(data: str, log: str, stuck: str | None, shutdown_timeout: float) -> None:
    transport = await connect(f"file://{data}", EmbeddedOptions(durability="always"))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        app = App(transport, shutdown_timeout_s=shutdown_timeout)

        async def handle(text: str) -> None:
            await asyncio.sleep(3600 if text == stuck else WORK_S)
            os.write(fd, f"{text}\n".encode())
            os.fsync(fd)

        subscribe(app, handle)
        await app.run()
    finally:
        os.close(fd)
        await transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("log")
    parser.add_argument("--stuck")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(main(args.data, args.log, args.stuck, args.shutdown_timeout))
