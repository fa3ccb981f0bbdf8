"""Idempotent consumers: process each message once per group, however often it is delivered.

The store claims the message's id for the handler's group before the handler runs. With a
SQL store the claim is a row inserted in the transaction the handler writes in
(``ctx.session``): the handler's effects and the claim commit together, and only then is
the message acknowledged. A duplicate is acknowledged without calling the handler.

The key is the id of the original message: a retried or redriven copy carries it in
``Pigeon-Original-Msg-Id``, so it counts as the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import ClaimInProgressError
from ...message import Headers, Message
from ...patterns.idempotency import IdempotencyStore
from ..context import Context
from ..control import Nack
from .base import CallNext


def logical_id(message: Message) -> str:
    return message.headers.get(Headers.ORIGINAL_MSG_ID) or message.id


class Idempotent:
    def __init__(self, store: IdempotencyStore, *, key: Callable[[Message], str] = logical_id) -> None:
        self.store = store
        self.key = key

    async def __call__(self, ctx: Context, call_next: CallNext) -> Any:
        scope = ctx.subscriber.group or ctx.subscriber.name
        try:
            async with self.store.claim(self.key(ctx.message), scope=scope) as claim:
                if claim.duplicate:
                    ctx.state["duplicate"] = True
                    return None
                if claim.session is not None:
                    ctx.state["session"] = claim.session
                return await call_next(ctx)
        except ClaimInProgressError as busy:
            # Another consumer holds it right now: look again once its claim would expire.
            raise Nack(delay=busy.retry_after, reason=str(busy)) from None
