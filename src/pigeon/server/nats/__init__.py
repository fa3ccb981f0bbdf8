"""A NATS core protocol server (PUB/SUB, queue groups, request-reply, headers, auth, TLS).

>>> async with NatsServer(ServerOptions(port=0)) as server:   # doctest: +SKIP
...     nc = await nats.connect(server.url)
"""

from .options import DEFAULT_PORT, ServerOptions
from .server import Delivery, NatsServer, Outgoing, Subscription

__all__ = ["DEFAULT_PORT", "Delivery", "NatsServer", "Outgoing", "ServerOptions", "Subscription"]
