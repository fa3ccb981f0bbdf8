"""Runs the chosen workloads on the chosen systems and gathers the figures.

Each system is provisioned (its server started, or its service found), opened, measured
workload by workload, ``runs`` times each, and closed before the next, so systems never
compete for the machine. Whatever goes wrong is reported in the results, never raised: a
system that cannot be reached gets ``{"error": ...}``, a workload it does not have
``{"value": null, "reason": ...}``, and a run that fails or times out ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import advantage, summarize
from .systems import System, Unreachable, load_system
from .workloads import WORKLOADS, Sizes, Workload

PIGEON = "pigeon_embedded"
RUN_TIMEOUT_S = 900.0

# (what is running, how many of the plan's steps just completed); called before and after runs
OnStep = Callable[[str, int], None]


@dataclass(frozen=True)
class Plan:
    systems: Sequence[str]
    workloads: Sequence[str]
    sizes: Sizes

    @property
    def steps(self) -> int:
        return len(self.systems) * len(self.workloads) * self.sizes.runs


async def compare(plan: Plan, on_step: OnStep) -> dict[str, dict[str, Any]]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as scratch:
        for name in plan.systems:
            results[name] = await _measure_system(name, plan, Path(scratch), on_step)
    _add_ratios(results, plan.workloads)
    return results


async def _measure_system(name: str, plan: Plan, scratch: Path, on_step: OnStep) -> dict[str, Any]:
    on_step(f"{name}: starting", 0)
    per_system = len(plan.workloads) * plan.sizes.runs
    try:
        cls = load_system(name)
        async with cls.provision(scratch) as where:
            system = cls(where)
            await system.open()
            try:
                return {w: await _measure(system, WORKLOADS[w], plan.sizes, on_step) for w in plan.workloads}
            finally:
                with contextlib.suppress(Exception):
                    await system.close()
    except Exception as error:  # one system's trouble is its own column's, not the run's
        on_step(name, per_system)
        return {"error": str(error) if isinstance(error, Unreachable) else f"{type(error).__name__}: {error}"}


async def _measure(system: System, workload: Workload, sizes: Sizes, on_step: OnStep) -> dict[str, Any]:
    reason = system.unsupported.get(workload.name)
    if reason is not None:
        on_step(system.name, sizes.runs)
        return {"value": None, "reason": reason}
    runs: list[dict[str, float]] = []
    for run in range(1, sizes.runs + 1):
        on_step(f"{system.name}: {workload.name} ({run}/{sizes.runs})", 0)
        try:
            runs.append(await asyncio.wait_for(workload.measure(system, sizes), RUN_TIMEOUT_S))
        except TimeoutError:
            on_step(system.name, sizes.runs - run + 1)
            return {"error": f"a run took longer than {RUN_TIMEOUT_S:.0f} s"}
        except Exception as error:  # a benchmark reports a failing system and goes on
            on_step(system.name, sizes.runs - run + 1)
            return {"error": f"{type(error).__name__}: {error}"}
        on_step(system.name, 1)
    return {
        figure: summarize([r[figure] for r in runs]) | {"unit": workload.unit} for figure in workload.figures
    }


def figure_value(results: dict[str, dict[str, Any]], system: str, workload: str, figure: str) -> float | None:
    """The median of one figure, or None when it was not measured (unsupported, failed, absent)."""
    measured = results.get(system, {}).get(workload, {}).get(figure)
    return None if measured is None else float(measured["value"])


def _add_ratios(results: dict[str, dict[str, Any]], workloads: Sequence[str]) -> None:
    """Every figure gets ``pigeon_ratio``: how many times better embedded pigeon's is (null when
    pigeon's figure is missing)."""
    for workload in map(WORKLOADS.__getitem__, workloads):
        for figure in workload.figures:
            ours = figure_value(results, PIGEON, workload.name, figure)
            for name in results:
                theirs = figure_value(results, name, workload.name, figure)
                if theirs is not None:
                    ratio = (
                        None
                        if ours is None
                        else advantage(ours, theirs, higher_is_better=workload.higher_is_better)
                    )
                    results[name][workload.name][figure]["pigeon_ratio"] = (
                        None if ratio is None else round(ratio, 3)
                    )
