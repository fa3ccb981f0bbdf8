"""The errors of event sourcing: each names the aggregate, event or projection at fault."""

from __future__ import annotations

from ..errors import ConcurrencyConflictError, PigeonError


class EventSourcingError(PigeonError):
    """Base of the errors raised by `pigeon.es`."""


class EventDefinitionError(EventSourcingError, TypeError):
    """An event class, an upcaster or an aggregate's appliers are declared wrongly."""


class UnknownEventTypeError(EventSourcingError, LookupError):
    """A stored event names a type the registry does not know (register its class)."""


class EventEncodeError(EventSourcingError, TypeError):
    """An event's fields cannot be stored as JSON."""


class EventDecodeError(EventSourcingError, ValueError):
    """A stored event does not decode into its class, even after upcasting."""


class UpcastError(EventSourcingError, ValueError):
    """A stored event's schema version cannot be brought to the current one."""


class InvalidAggregateIdError(EventSourcingError, ValueError):
    """An aggregate id or type cannot be used in a subject."""


class AggregateNotFoundError(EventSourcingError, LookupError):
    """No event was ever stored for that aggregate (or none up to the requested point)."""


class AggregateConflictError(ConcurrencyConflictError, EventSourcingError):
    """Another writer appended to the aggregate since it was loaded: nothing was written.

    ``expected`` and ``actual`` are aggregate versions (how many events it has).
    """

    def __init__(self, aggregate: str, *, expected: int, actual: int) -> None:
        super().__init__(
            f"aggregate {aggregate} is at version {actual}, not {expected} as expected: another "
            "writer appended first; load it again and retry the command",
            expected=expected,
            actual=actual,
        )
        self.aggregate = aggregate


class SnapshotStoreError(EventSourcingError):
    """A snapshot store cannot be reached or holds data it cannot read."""


class ProjectionError(EventSourcingError):
    """A projection stopped: its apply failed, or it was misconfigured. ``__cause__`` has why."""
