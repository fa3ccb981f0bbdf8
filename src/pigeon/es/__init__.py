"""Event sourcing and CQRS on pigeon streams (docs/event-sourcing.md).

Events per aggregate in an `EventStore` (a stream of the embedded engine), aggregates and
their `Repository`, upcasting of old event versions, snapshots, time travel, and SQL read
models kept by projections (`pigeon.es.projection`, which needs the ``sql`` extra).
"""

from .aggregate import Aggregate, LoadInfo, Repository
from .errors import (
    AggregateConflictError,
    AggregateNotFoundError,
    EventDecodeError,
    EventDefinitionError,
    EventEncodeError,
    EventSourcingError,
    InvalidAggregateIdError,
    ProjectionError,
    SnapshotStoreError,
    UnknownEventTypeError,
    UpcastError,
)
from .events import EventRegistry, domain_event, event_type_of
from .handlers import handles
from .snapshots import EngineSnapshotStore, FolderSnapshotStore, Snapshot, SnapshotStore
from .store import AppendResult, EventStore, Position, RecordedEvent, StoredEvent

__all__ = [
    "Aggregate",
    "AggregateConflictError",
    "AggregateNotFoundError",
    "AppendResult",
    "EngineSnapshotStore",
    "EventDecodeError",
    "EventDefinitionError",
    "EventEncodeError",
    "EventRegistry",
    "EventSourcingError",
    "EventStore",
    "FolderSnapshotStore",
    "InvalidAggregateIdError",
    "LoadInfo",
    "Position",
    "ProjectionError",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "SnapshotStore",
    "SnapshotStoreError",
    "StoredEvent",
    "UnknownEventTypeError",
    "UpcastError",
    "domain_event",
    "event_type_of",
    "handles",
]
