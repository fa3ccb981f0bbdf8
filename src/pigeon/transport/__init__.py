"""Transports: one contract (`base`), one module per engine, chosen by URL scheme.

``pigeon.connect(url)``: ``memory://`` (in-process, nothing kept), ``file://PATH`` (the
embedded engine), ``nats://``, ``redis://``, ``amqp://``, ``postgresql://``. Each client
library is an extra: ``pip install 'pigeon[nats]'`` and so on.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from ..errors import MissingExtraError, UnknownSchemeError
from .base import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    Received,
    StreamSpec,
    StreamState,
    Subscription,
    Transport,
)

# scheme -> (module, class, the extra that installs its client library, that library's module)
_TRANSPORTS: dict[str, tuple[str, str, str | None, str | None]] = {
    "memory": ("memory", "MemoryTransport", None, None),
    "file": ("embedded", "EmbeddedTransport", None, None),
    "nats": ("nats", "NatsTransport", "nats", "nats"),
    "redis": ("redis", "RedisTransport", "redis", "redis"),
    "amqp": ("rabbitmq", "RabbitMQTransport", "rabbitmq", "aio_pika"),
    "postgresql": ("postgres", "PostgresTransport", "postgres", "asyncpg"),
    "postgres": ("postgres", "PostgresTransport", "postgres", "asyncpg"),
}


def transport_class(url: str) -> type[Transport]:
    scheme = urlsplit(url).scheme or "file"
    entry = _TRANSPORTS.get(scheme)
    if entry is None:
        raise UnknownSchemeError(
            f"no transport for {scheme!r} in {url!r}; use one of: "
            + ", ".join(f"{s}://" for s in sorted(set(_TRANSPORTS)))
        )
    module, name, extra, client = entry
    if client is not None:
        try:
            importlib.import_module(client)
        except ImportError:
            raise MissingExtraError(
                f"the {scheme}:// transport needs its client library: pip install 'pigeon[{extra}]'"
            ) from None
    cls: type[Transport] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls


async def connect(url: str, options: Any = None) -> Transport:
    """Open the transport the URL's scheme names; ``options`` is that transport's options object."""
    return await transport_class(url).open(url, options)


__all__ = [
    "Capabilities",
    "Consumer",
    "ConsumerSpec",
    "Received",
    "StreamSpec",
    "StreamState",
    "Subscription",
    "Transport",
    "connect",
    "transport_class",
]
