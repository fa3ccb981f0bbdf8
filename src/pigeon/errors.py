"""Every exception pigeon raises on purpose.

A user's mistake or a refused operation always surfaces as one of these, with a message
that names what was wrong, so callers can catch precisely and the CLI can print one line.
"""

from __future__ import annotations


class PigeonError(Exception):
    """Base of every error pigeon raises deliberately."""


class InvalidSubjectError(PigeonError, ValueError):
    """A subject or subscription pattern breaks the token syntax."""


class InvalidNameError(PigeonError, ValueError):
    """A stream, group or other resource name is not allowed."""


class InvalidConfigError(PigeonError, ValueError):
    """A configuration value is out of range or inconsistent."""


class MessageTooLargeError(PigeonError, ValueError):
    """A message exceeds the configured maximum size."""


class StreamNotFoundError(PigeonError, LookupError):
    """No stream has that name."""


class StreamExistsError(PigeonError):
    """A stream with that name exists already with a different configuration."""


class NoStreamForSubjectError(PigeonError, LookupError):
    """A durable publish named a subject that no stream captures."""


class SubjectOverlapError(PigeonError, ValueError):
    """A stream's subjects overlap those another stream already captures."""


class StreamFullError(PigeonError):
    """The stream reached a limit and its discard policy rejects new messages.

    ``limit`` names it ("messages" or "bytes") when the engine knows which one it was.
    """

    limit: str = ""


class StorageError(PigeonError, OSError):
    """The engine could not write to its data folder (a full disk, an I/O error).

    The failed write left nothing behind; what was acknowledged before is intact. ``errno``
    is the system's (ENOSPC for a full disk).
    """


class ConcurrencyConflictError(PigeonError):
    """An optimistic-concurrency expectation on a publish did not hold; nothing was written."""

    def __init__(self, message: str, *, expected: int | None, actual: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class EngineClosedError(PigeonError):
    """The engine was closed; no further operations are possible."""


class DataDirLockedError(PigeonError):
    """Another process owns the data folder."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class CorruptLogError(PigeonError):
    """Stored data failed validation somewhere other than the unacknowledged tail."""

    def __init__(self, message: str, *, path: str, position: int) -> None:
        super().__init__(message)
        self.path = path
        self.position = position


class InvalidMessageError(PigeonError, ValueError):
    """A message field (id, key, header) is malformed."""


class GroupNotFoundError(PigeonError, LookupError):
    """No consumer group has that name on that stream."""


class GroupExistsError(PigeonError):
    """A group with that name exists already with a different configuration."""


class GroupHasMembersError(PigeonError):
    """The operation needs a group with no members (e.g. resetting offsets)."""


class DeliveryNotOwnedError(PigeonError):
    """A delivery was settled after its member lost it (revoked partition, expired lease)."""


class AlreadySettledError(PigeonError):
    """A delivery was acked, nacked or terminated already."""


class MemberNotFoundError(PigeonError, LookupError):
    """The member left the group or was removed from it (session timeout, poll interval)."""


class UnsupportedFeatureError(PigeonError, NotImplementedError):
    """The transport cannot provide a feature; the message names the backend and an alternative."""

    def __init__(self, backend: str, feature: str, alternative: str) -> None:
        super().__init__(f"the {backend} transport does not support {feature}: {alternative}")
        self.backend = backend
        self.feature = feature
        self.alternative = alternative


class MissingExtraError(PigeonError, ImportError):
    """A transport's client library is not installed."""


class UnknownSchemeError(PigeonError, ValueError):
    """``pigeon.connect`` got a URL whose scheme names no transport."""


class NoRespondersError(PigeonError):
    """A request reached no subscriber (the engine could tell at once)."""


class RequestTimeoutError(PigeonError, TimeoutError):
    """A request got no reply within its timeout."""


class TransportClosedError(PigeonError):
    """The transport was closed (or lost its connection for good)."""


class InvalidHandlerError(PigeonError, TypeError):
    """A handler's signature or settings cannot work (found when it is registered)."""


class PayloadDecodeError(PigeonError, ValueError):
    """A payload does not decode to the type the handler asks for: a poison message."""


class PayloadEncodeError(PigeonError, TypeError):
    """A value cannot be encoded as a payload."""


class HandlerTimeoutError(PigeonError, TimeoutError):
    """A handler ran past its processing deadline and was cancelled."""


class InvalidIdempotencyKeyError(PigeonError, ValueError):
    """An idempotency key or scope is not text of 1 to 255 characters."""


class ClaimInProgressError(PigeonError):
    """Another consumer holds the message's idempotency claim right now (or crashed within its lease).

    ``retry_after`` is how many seconds remain until that claim expires: nack with that delay.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
