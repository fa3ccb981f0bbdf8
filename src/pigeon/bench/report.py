"""The results as one JSON object and as tables for people."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from .load import PAYLOAD_BYTES
from .runner import Plan
from .workloads import WORKLOADS


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "memory_gib": round(int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]) / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _proc_field(path: str, name: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)


def document(plan: Plan, results: dict[str, Any], targets: list[dict[str, Any]]) -> dict[str, Any]:
    """One object keyed by system, plus ``run`` (what was measured, where) and ``targets``."""
    sizes = plan.sizes
    run = {
        "messages": sizes.count,
        "runs": sizes.runs,
        "payload_bytes": PAYLOAD_BYTES,
        "requests": sizes.requests,
        "e2e_rate_msgs_per_s": sizes.rate,
        "e2e_messages": sizes.e2e_messages,
        "backlog_messages": sizes.backlog,
        "workloads": list(plan.workloads),
        "machine": machine(),
    }
    return {**results, "run": run, "targets": targets}


def tables(report: dict[str, Any], systems: Sequence[str]) -> Group:
    parts: list[Table] = []
    for name in report["run"]["workloads"]:
        workload = WORKLOADS[name]
        table = Table(
            "system",
            *(f"{f} ({workload.unit})" if f != "msgs_per_s" else "msgs/s" for f in workload.figures),
            "spread",
            "pigeon x",
            title=f"{name}: {workload.description}",
            title_justify="left",
        )
        for system in systems:
            table.add_row(system, *_cells(report[system], name, workload.figures))
        parts.append(table)
    parts.append(_targets(report["targets"]))
    return Group(*parts)


def _cells(measured: dict[str, Any], workload: str, figures: Sequence[str]) -> list[str]:
    blank = [""] * (len(figures) + 1)
    if "error" in measured:
        return [f"error: {measured['error']}", *blank]
    result = measured[workload]
    if "error" in result:
        return [f"error: {result['error']}", *blank]
    if result.get("reason"):
        return [f"- ({result['reason']})", *blank]
    first = result[figures[0]]
    ratio = first.get("pigeon_ratio")
    return [
        *(_number(result[f]["value"]) for f in figures),
        f"{_number(first['min'])} .. {_number(first['max'])}",
        "" if ratio is None else f"{ratio:.2f}",
    ]


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _targets(targets: list[dict[str, Any]]) -> Table:
    table = Table("target", "workload", "ratio", "needed", "met", title="targets", title_justify="left")
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        ratio = t.get("reason") if t["ratio"] is None else f"{t['ratio']:.2f}"
        table.add_row(t["target"], f"{t['workload']} {t['figure']}", ratio, f">= {t['minimum_ratio']:g}", met)
    return table
