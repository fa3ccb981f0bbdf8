"""What a handler (and each middleware) knows about the message it is processing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import AlreadySettledError, InvalidHandlerError
from ..message import Message
from ..transport.base import PubAck, Received

if TYPE_CHECKING:
    from .app import App
    from .subscriber import Subscriber


class Context:
    """One message being processed by one handler.

    A handler asks for it by annotating a parameter with `Context`. With ``ack="manual"``
    the handler settles through it (``await ctx.ack()`` after its database commit, say).
    Messages published through `publish` carry the correlation and causation ids (and
    whatever else middleware adds) of the message being processed.
    """

    def __init__(
        self,
        app: App,
        subscriber: Subscriber,
        message: Message,
        received: Received | None = None,
        attempt: int = 1,
    ) -> None:
        self.app = app
        self.subscriber = subscriber
        self.message = message
        self.received = received
        self.attempt = attempt
        self.settled = False
        self.payload: Any = None  # the decoded payload, once decoded
        # Middleware's place for what it provides to the handler (e.g. "session").
        self.state: dict[str, Any] = {}
        self.publish_headers: dict[str, str] = {}
        self.publish_hooks: list[Callable[[dict[str, str]], None]] = []

    @property
    def session(self) -> Any:
        """The database session the idempotency middleware opened (its transaction holds the claim)."""
        try:
            return self.state["session"]
        except KeyError:
            raise InvalidHandlerError(
                "no database session: add the Idempotent middleware with a SQL store to this handler"
            ) from None

    async def publish(
        self,
        subject: str,
        value: Any = b"",
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> PubAck | None:
        return await self.app.publish(
            subject, value, key=key, headers=self.outgoing_headers(headers), msg_id=msg_id
        )

    def outgoing_headers(self, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        """Headers for a message sent while handling this one: what middleware adds
        (correlation, trace context), then ``headers``."""
        merged = dict(self.publish_headers)
        for hook in self.publish_hooks:
            hook(merged)
        if headers:
            merged.update(headers)
        return merged

    # -- manual settlement ----------------------------------------------------------------------

    def _received(self) -> Received:
        if self.received is None:
            raise InvalidHandlerError("a core subscription's messages are not acknowledged")
        if self.settled:
            raise AlreadySettledError(f"{self.message!r} is already settled")
        self.settled = True
        return self.received

    async def ack(self) -> None:
        await self._received().ack()

    async def nack(self, delay: float | None = None, *, error: BaseException | str | None = None) -> None:
        await self._received().nack(delay, error=error)

    async def term(self, reason: BaseException | str | None = None) -> None:
        await self._received().term(reason)

    async def in_progress(self) -> None:
        if self.received is not None and not self.settled:
            await self.received.in_progress()
