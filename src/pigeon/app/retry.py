"""Retry with backoff: how a failed message is tried again, and when pigeon gives up.

Three strategies, chosen per handler:

- ``in_process``: the handler is called again in the same delivery after the backoff
  (the lease is kept alive meanwhile). Fast; a crash starts the count again.
- ``broker``: the message is nacked with the backoff as delay and the engine redelivers it
  (`Capabilities.delayed_nack`); the attempt is the delivery count.
- ``retry_stream``: for engines without delayed redelivery, the message is copied to one
  retry stream per group (``<stream>-<group>-retry``) with a ``Pigeon-Next-Retry-At``
  header and the original acknowledged; the group's retry consumer waits until then and
  calls the handler again.

``auto`` (the default) is ``broker`` where the transport has delayed nacks, else
``retry_stream``. After ``max_attempts`` attempts (or at once, for a non-retryable error)
the message goes to the group's dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import InvalidConfigError, PayloadDecodeError
from ..transport.base import Backoff
from .control import HandlerControl, Retry

Strategy = Literal["auto", "in_process", "broker", "retry_stream"]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=1.0, multiplier=2.0, max_s=60.0))
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()
    strategy: Strategy = "auto"

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidConfigError(f"max_attempts must be a positive integer, not {attempts!r}")
        if not isinstance(self.backoff, Backoff):
            raise InvalidConfigError("backoff must be a pigeon Backoff")
        if self.strategy not in ("auto", "in_process", "broker", "retry_stream"):
            raise InvalidConfigError(
                f"retry strategy must be auto, in_process, broker or retry_stream, not {self.strategy!r}"
            )
        for name in ("retry_on", "give_up_on"):
            kinds = getattr(self, name)
            if not isinstance(kinds, tuple) or not all(
                isinstance(k, type) and issubclass(k, BaseException) for k in kinds
            ):
                raise InvalidConfigError(f"{name} must be a tuple of exception classes")

    def retryable(self, error: BaseException) -> bool:
        if isinstance(error, Retry):
            return True
        if isinstance(error, (PayloadDecodeError | HandlerControl, self.give_up_on)):
            return False
        return isinstance(error, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th attempt failed."""
        return self.backoff.delay(attempt)


NO_RETRY = RetryPolicy(max_attempts=1)
