"""Crash campaign: SIGKILL writer processes at random moments, many times, on one data folder.

The long version of ``tests/test_engine_durability.py::test_sigkill_*``, with the same writer
and checks (``tests/crash_writer.py``): each cycle starts a writer that recovers the folder and
publishes from concurrent tasks (single, batch and bulk publishes, keyed and not, headers and
message ids, 64 KiB segments that roll all the time), kills it with SIGKILL after a random
delay, then checks a copy of the folder (sometimes the folder itself): every publish ever
acknowledged is stored at its acknowledged partition and offset with its payload, offsets are
dense, no batch is corrupt, every stored message is one that was published, unaltered and
stored once, nothing seen by an earlier check vanished, and message ids acknowledged before
a crash are still deduplicated after it.

Prints a JSON summary; the exit status is 1 if anything acknowledged was lost or corrupt.

    python benchmarks/crash_campaign.py [--cycles 200] [--durability always|interval]
                                        [--seed N] [--max-delay S] [--dir PATH] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from crash_writer import CrashCampaign  # the writer and checks the test suite uses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="kills (default 200)")
    parser.add_argument("--durability", choices=("always", "interval"), default="always")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument(
        "--max-delay", type=float, default=0.35, help="longest wait after ready before a kill (s)"
    )
    parser.add_argument("--dir", type=Path, help="work folder, kept afterwards (default: a temporary one)")
    parser.add_argument("--verbose", action="store_true", help="one line per cycle on stderr")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31

    def log(line: str) -> None:
        if args.verbose:
            print(line, file=sys.stderr, flush=True)

    work = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="pigeon-crash-"))
    campaign = CrashCampaign(
        work, seed=seed, durability=args.durability, max_delay_s=args.max_delay, log=log
    )
    started = time.monotonic()
    lost = corrupt = cycles_with_problems = 0
    problems: list[str] = []
    try:
        for _ in range(args.cycles):
            report = campaign.run_cycle()
            lost += report.lost
            corrupt += report.corrupt
            if report.problems:
                cycles_with_problems += 1
                problems += report.problems[:5]
                for problem in report.problems:
                    print(problem, file=sys.stderr, flush=True)
    finally:
        seconds = time.monotonic() - started
        stored = len(campaign.seen)
        if args.dir is None and not problems:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "cycles": args.cycles,
        "acknowledged_checked": len(campaign.acked),
        "lost": lost,
        "corrupt": corrupt,
        "seconds": round(seconds, 1),
        "durability": args.durability,
        "seed": seed,
        "ack_checks": campaign.ack_checks,  # acknowledged messages verified, summed over all checks
        "messages_stored": stored,
        "torn_tails_recovered": campaign.torn_tails,
        "cycles_with_problems": cycles_with_problems,
        "problems": problems[:20],
    }
    if problems:
        summary["work_dir"] = str(work)
    print(json.dumps(summary, indent=2))
    return 1 if lost or corrupt or problems else 0


if __name__ == "__main__":
    sys.exit(main())
