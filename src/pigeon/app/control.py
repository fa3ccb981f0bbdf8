"""Exceptions a handler raises to say how its message should be settled.

Any other exception is a failure that the handler's `RetryPolicy` judges.
"""

from __future__ import annotations


class HandlerControl(Exception):
    """Base of the settle-by-exception signals."""


class Nack(HandlerControl):
    """Deliver this message again, after ``delay`` seconds (default: the retry policy's backoff).

    The attempt counts toward the policy's ``max_attempts``.
    """

    def __init__(self, delay: float | None = None, reason: str = "nacked by the handler") -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(HandlerControl):
    """Never retry: send the message to the group's dead letters now, with ``reason``."""

    def __init__(self, reason: str = "rejected by the handler") -> None:
        super().__init__(reason)


class PoisonMessage(Reject):
    """The payload could not be decoded or validated; retrying cannot help."""


class Retry(HandlerControl):
    """Retry under the handler's policy even if the error would not count as retryable;
    ``delay`` overrides the backoff for this attempt."""

    def __init__(self, reason: str = "retry requested by the handler", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay
