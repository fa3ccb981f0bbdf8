"""The reliability campaign's modules (``benchmarks/reliability_lib``) for the quick tests.

Not collected by pytest (no ``test_`` prefix). The campaigns are the benchmark's; the tests
run them small and assert their invariants, never their timings.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from reliability_lib import crash, disk, fuzz, soak

__all__ = ["crash", "disk", "fuzz", "soak"]
