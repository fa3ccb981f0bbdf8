"""Middleware shipped with pigeon, one per module; any ``async (ctx, call_next)`` callable works too."""

from .base import CallNext, Middleware, compose
from .correlation import correlation
from .idempotency import Idempotent
from .metrics import Metrics
from .ratelimit import RateLimit
from .timeout import Timeout


def __getattr__(name: str) -> object:
    # Tracing needs the optional OpenTelemetry extra: imported only when asked for.
    if name == "Tracing":
        from .tracing import Tracing

        return Tracing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CallNext",
    "Idempotent",
    "Metrics",
    "Middleware",
    "RateLimit",
    "Timeout",
    "Tracing",
    "compose",
    "correlation",
]
