"""The reliability campaign: crash, disk full, bad input and soak, summarised in docs/reliability.md.

    python benchmarks/reliability.py [--cycles 200] [--only crash,disk,fuzz,soak] [--quick]
                                     [--examples N] [--soak-minutes M] [--seed N] [--dir PATH]
                                     [--verbose]

Each campaign lives in ``benchmarks/reliability_lib`` and returns its figures and the
invariants it found broken; the quick forms run in ``tests/test_reliability_*.py``. Prints
the JSON summary and writes docs/reliability.md; the exit status is 1 if any invariant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from reliability_lib import crash, disk, fuzz, soak
from reliability_lib.common import Report
from reliability_lib.document import write_document

CAMPAIGNS = ("crash", "disk", "fuzz", "soak")
DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="kills of pigeon serve (default 200)")
    parser.add_argument("--examples", type=int, default=1000, help="fuzz examples per target (default 1000)")
    parser.add_argument(
        "--soak-minutes",
        type=float,
        default=20.0,
        help="length of the soak at half the maximum rate (default 20)",
    )
    parser.add_argument("--only", default=",".join(CAMPAIGNS), help="comma-separated: crash,disk,fuzz,soak")
    parser.add_argument("--quick", action="store_true", help="5 cycles, 100 examples, an 18-second soak")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--dir", type=Path, help="work folder, kept afterwards (default: a temporary one)")
    parser.add_argument("--doc", type=Path, default=DOC, help="where to write the summary")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name]
    if unknown := set(only) - set(CAMPAIGNS):
        parser.error(f"unknown campaigns {sorted(unknown)}: choose from {', '.join(CAMPAIGNS)}")
    cycles, examples, soak_minutes = (
        (5, 100, 0.3) if args.quick else (args.cycles, args.examples, args.soak_minutes)
    )
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31

    def log(line: str) -> None:
        if args.verbose:
            print(line, file=sys.stderr, flush=True)

    work = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="pigeon-reliability-"))
    reports: list[Report] = []
    # hypothesis and the servers' clients print progress on stdout, which carries the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        for name in only:
            log(f"campaign {name}")
            if name == "crash":
                reports.append(crash.run(work / "crash", cycles, seed, log))
            elif name == "disk":
                reports.append(disk.run(work / "disk") if disk.root_available() else _needs_root())
            elif name == "fuzz":
                reports.append(fuzz.run(work / "fuzz", examples, seed))
            else:
                reports.append(soak.run(work / "soak", soak_minutes, log))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"seed": seed, "quick": args.quick, **{r.name: r.as_json() for r in reports}}
    write_document(
        args.doc, reports, seed=seed, command=" ".join(["python benchmarks/reliability.py", *sys.argv[1:]])
    )
    print(json.dumps(summary, indent=2))
    return 0 if all(r.ok for r in reports) else 1


def _needs_root() -> Report:
    report = Report("disk")
    report.fail("not run: mounting a small tmpfs needs root")
    return report


if __name__ == "__main__":
    sys.exit(main())
