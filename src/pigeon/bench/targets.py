"""The roadmap's targets, checked against one run's figures and reported (never asserted).

Each target is ``met`` true or false, or null with a ``reason`` when a figure it needs is
missing from the run (a system or workload not chosen, unreachable, or failed).
"""

from __future__ import annotations

from typing import Any

from .runner import PIGEON, figure_value
from .stats import advantage
from .workloads import WORKLOADS

NETWORKED_PEERS = ("nats_jetstream", "redis_streams", "rabbitmq", "postgres")
PEERS = (*NETWORKED_PEERS, "litequeue", "persist_queue")
RATE = "msgs_per_s"
# pigeon serve as installed, and tuned for latency (docs/benchmarks.md says which is which)
SERVES = {"pigeon_serve": "pigeon serve", "pigeon_serve_busy_poll": "pigeon serve --busy-poll 500"}


def check(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        *(
            _versus_best(results, w, NETWORKED_PEERS, 10.0, "10x the best networked peer")
            for w in ("publish_awaited", "consume_ack")
        ),
        *(
            _versus_best(results, w, PEERS, 1.0, "ahead of every peer")
            for w in ("publish_pipelined", "consume_ordered_batch")
        ),
        *_serve_versus_nats(results),
        _target(
            "pigeon embedded within 2x of the plain-file floor",
            "publish_pipelined",
            RATE,
            0.5,
            _ratio(results, PIGEON, "floor_file_append", "publish_pipelined", RATE),
            "needs pigeon_embedded and floor_file_append",
        ),
    ]


def _ratio(
    results: dict[str, dict[str, Any]], ours: str, theirs: str, workload: str, figure: str
) -> float | None:
    a, b = figure_value(results, ours, workload, figure), figure_value(results, theirs, workload, figure)
    if a is None or b is None:
        return None
    return advantage(a, b, higher_is_better=WORKLOADS[workload].higher_is_better)


def _versus_best(
    results: dict[str, dict[str, Any]], workload: str, peers: tuple[str, ...], minimum: float, text: str
) -> dict[str, Any]:
    measured = {p: v for p in peers if (v := figure_value(results, p, workload, RATE)) is not None}
    best = max(measured, key=measured.__getitem__, default=None)
    ratio = None if best is None else _ratio(results, PIGEON, best, workload, RATE)
    target = _target(
        f"pigeon embedded {text}", workload, RATE, minimum, ratio, "needs pigeon_embedded and a peer"
    )
    target["against"] = best
    return target


def _serve_versus_nats(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """pigeon serve at least on par with nats-server, on every figure both have."""
    return [
        _target(f"{text} on par with nats-server (same client)", workload.name, figure, 1.0, ratio, "")
        for serve, text in SERVES.items()
        for workload in WORKLOADS.values()
        for figure in workload.figures
        if (ratio := _ratio(results, serve, "nats_jetstream", workload.name, figure)) is not None
    ]


def _target(
    text: str, workload: str, figure: str, minimum: float, ratio: float | None, missing: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"target": text, "workload": workload, "figure": figure, "minimum_ratio": minimum}
    if ratio is None:
        return out | {"ratio": None, "met": None, "reason": f"not measured in this run: {missing}"}
    return out | {"ratio": round(ratio, 3), "met": ratio >= minimum}
