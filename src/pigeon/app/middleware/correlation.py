"""Correlation and causation ids: which original message a published one descends from.

Every message published while handling message M carries M's correlation id (M's own id
when M has none: M started the conversation) and M's id as its causation id. The App
installs this middleware by default.
"""

from __future__ import annotations

from typing import Any

from ...message import Headers
from ..context import Context
from .base import CallNext


async def correlation(ctx: Context, call_next: CallNext) -> Any:
    message = ctx.message
    ctx.publish_headers[Headers.CORRELATION_ID] = message.headers.get(Headers.CORRELATION_ID) or message.id
    ctx.publish_headers[Headers.CAUSATION_ID] = message.id
    return await call_next(ctx)
