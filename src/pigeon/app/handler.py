"""What a handler function asks for, read from its signature once at registration.

Parameters are filled by annotation: `Context` gets the processing context, `Message` the
raw message, and the one remaining parameter the decoded payload (``bytes`` when it is not
annotated). A batch handler annotates its payload parameter ``list[T]`` (and may ask for
``list[Context]``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidHandlerError
from ..message import Message
from .codec import Codec
from .context import Context

HandlerFunc = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Handler:
    func: HandlerFunc
    name: str
    payload_type: Any  # the type one message decodes to
    is_batch: bool
    # Per parameter, in order: "payload", "context", "message" (single) or "contexts" (batch).
    roles: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, func: HandlerFunc, *, batch: bool) -> Handler:
        name = getattr(func, "__qualname__", repr(func))
        if not inspect.iscoroutinefunction(func):
            raise InvalidHandlerError(f"handler {name} must be an async function")
        try:
            hints = typing.get_type_hints(func)
        except Exception as exc:
            raise InvalidHandlerError(f"handler {name}: cannot resolve its annotations: {exc}") from exc
        roles: list[tuple[str, str]] = []
        payload_type: Any = None
        for param in inspect.signature(func).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise InvalidHandlerError(f"handler {name}: *args and **kwargs cannot be filled")
            annotation = hints.get(param.name, bytes)
            if annotation is Context:
                role = "context"
            elif annotation is Message:
                role = "message"
            elif annotation == list[Context]:
                role = "contexts"
            elif payload_type is None:
                role, payload_type = "payload", annotation
            else:
                raise InvalidHandlerError(
                    f"handler {name}: parameter {param.name!r} is a second payload; annotate it "
                    "Context or Message, or remove it"
                )
            roles.append((param.name, role))
        if batch:
            if payload_type is None or typing.get_origin(payload_type) is not list:
                raise InvalidHandlerError(f"batch handler {name} must take its messages as list[T]")
            (payload_type,) = typing.get_args(payload_type) or (bytes,)
            if any(role in ("context", "message") for _, role in roles):
                raise InvalidHandlerError(f"batch handler {name}: ask for list[Context], not one Context")
        elif any(role == "contexts" for _, role in roles):
            raise InvalidHandlerError(f"handler {name}: list[Context] is for batch handlers (batch=...)")
        return cls(func, name, bytes if payload_type is None else payload_type, batch, tuple(roles))

    async def decode(self, codec: Codec, ctx: Context) -> Any:
        ctx.payload = await codec.decode(ctx.message.payload, self.payload_type, ctx.message.subject)
        return ctx.payload

    async def call(self, codec: Codec, ctx: Context) -> Any:
        payload = await self.decode(codec, ctx)
        args = {
            name: payload if role == "payload" else ctx if role == "context" else ctx.message
            for name, role in self.roles
        }
        return await self.func(**args)

    async def call_batch(self, contexts: Sequence[Context]) -> Any:
        payloads = [ctx.payload for ctx in contexts]
        args = {name: payloads if role == "payload" else list(contexts) for name, role in self.roles}
        return await self.func(**args)
