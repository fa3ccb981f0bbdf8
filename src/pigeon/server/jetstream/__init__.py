"""JetStream on pigeon's NATS server, backed by the embedded engine (first slice).

>>> js = await JetStream.attach(server, engine)   # doctest: +SKIP
"""

from .api import JetStream
from .errors import ApiError

__all__ = ["ApiError", "JetStream"]
