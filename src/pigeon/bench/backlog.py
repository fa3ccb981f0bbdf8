"""The backlog's memory: a child process stores ``count`` messages, then drains them.

The figure is the peak RSS of whoever holds the backlog: the child itself for in-process
systems (``getrusage`` of a fresh interpreter, so nothing else this run did counts), or the
server the harness started for it (its high-water mark, reset just before the child starts).

    python -m pigeon.bench.backlog SYSTEM ADDRESS COUNT    (the child; prints one JSON object)
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .load import FILL_CHUNK, Counter, stamped
from .systems import load_system
from .systems.base import System, Where


async def peak_rss_mb(system: System, count: int) -> float:
    pid = system.where.server_pid if system.backlog_rss == "server" else None
    if pid is not None:
        _reset_high_water(pid)
        address = system.where.address
    else:
        # A folder of its own: this process still holds the system's (pigeon locks its folder).
        address = tempfile.mkdtemp(prefix="backlog-", dir=system.where.address)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pigeon.bench.backlog",
            system.name,
            address,
            str(count),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await child.communicate()
    finally:
        if pid is None:
            shutil.rmtree(address, ignore_errors=True)
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or [f"exit status {child.returncode}"]
        raise RuntimeError(f"the backlog child failed: {lines[-1]}")
    if pid is not None:
        return _high_water_kib(pid) / 1024
    mb: float = json.loads(out)["peak_rss_mb"]
    return mb


def _reset_high_water(pid: int) -> None:
    # Writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _high_water_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


async def _store_and_drain(system: System, count: int) -> None:
    await system.open()
    try:
        async with system.durable() as queue:
            for start in range(0, count, FILL_CHUNK):
                # Distinct payloads: a backlog of one shared object would cost nothing to hold.
                await queue.publish_many([stamped(start + i) for i in range(min(FILL_CHUNK, count - start))])
            counter = Counter(count)
            if "consume_ordered_batch" in system.unsupported:
                await queue.consume(count, counter)
            else:
                await queue.consume_batches(count, counter)
            counter.check("backlog drain")
    finally:
        await system.close()


def main(argv: Sequence[str]) -> int:
    name, address, count = argv
    system = load_system(name)(Where(address))
    asyncio.run(_store_and_drain(system, int(count)))
    # Linux reports ru_maxrss in KiB.
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
