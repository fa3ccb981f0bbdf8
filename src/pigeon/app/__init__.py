"""The application layer: handlers, middleware and the reliability patterns, on any transport."""

from .app import App
from .codec import Codec, JsonCodec
from .context import Context
from .control import Nack, PoisonMessage, Reject, Retry
from .flow import Batch, Flow
from .middleware.base import CallNext, Middleware
from .redrive import RedrivePolicy
from .retry import NO_RETRY, RetryPolicy
from .subscriber import SubscriberSpec

__all__ = [
    "NO_RETRY",
    "App",
    "Batch",
    "CallNext",
    "Codec",
    "Context",
    "Flow",
    "JsonCodec",
    "Middleware",
    "Nack",
    "PoisonMessage",
    "RedrivePolicy",
    "Reject",
    "Retry",
    "RetryPolicy",
    "SubscriberSpec",
]
