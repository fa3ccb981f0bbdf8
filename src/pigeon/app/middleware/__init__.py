"""Middleware shipped with pigeon, one per module; any ``async (ctx, call_next)`` callable works too."""

from .base import CallNext, Middleware, compose
from .correlation import correlation
from .idempotency import Idempotent
from .ratelimit import RateLimit
from .timeout import Timeout

__all__ = ["CallNext", "Idempotent", "Middleware", "RateLimit", "Timeout", "compose", "correlation"]
