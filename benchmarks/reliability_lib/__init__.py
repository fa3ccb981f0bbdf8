"""The reliability campaign's machinery (``benchmarks/reliability.py``; quick forms in
``tests/test_reliability_*.py``): one module per campaign (`crash`, `disk`, `fuzz`, `soak`)
returning a report of figures and failed invariants, and the pieces they share.

The `pigeon serve` process wrapper is the test suite's (``tests/serve_process.py``), so the
campaign and the tests start the server the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
