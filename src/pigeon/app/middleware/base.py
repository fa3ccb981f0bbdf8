"""Middleware: code that wraps every handler call, onion style.

A middleware is any callable ``async (ctx, call_next) -> result``: it may act before and
after ``await call_next(ctx)``, replace the result, or raise (a `Nack`, `Reject` or
`Retry` from `pigeon.app.control`, or any error for the retry policy to judge). App-level
middleware wraps handler-level middleware, in the order given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..context import Context

CallNext = Callable[[Context], Awaitable[Any]]
Middleware = Callable[[Context, CallNext], Awaitable[Any]]


def compose(middleware: Sequence[Middleware], handler: CallNext) -> CallNext:
    """One callable running ``middleware[0]`` outermost and ``handler`` innermost."""
    call = handler
    for layer in reversed(middleware):
        call = _bind(layer, call)
    return call


def _bind(layer: Middleware, call_next: CallNext) -> CallNext:
    async def call(ctx: Context) -> Any:
        return await layer(ctx, call_next)

    return call
