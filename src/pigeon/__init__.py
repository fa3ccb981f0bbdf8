"""pigeon: event-driven messaging for Python, with the reliability patterns built in."""

from .message import Headers, Message

__version__ = "0.1.0"

__all__ = ["Headers", "Message", "__version__"]
