"""Aggregates: commands produce events, events change state, and a repository stores them.

::

    class Account(Aggregate):
        balance = 0

        def deposit(self, amount: int) -> None:       # a command: checks, then an event
            if amount <= 0:
                raise ValueError("deposit a positive amount")
            self.trigger(Deposited(amount))

        @handles(Deposited)                            # applying an event: no checks, no I/O
        def _deposited(self, event: Deposited) -> None:
            self.balance += event.amount

A repository loads an aggregate (latest snapshot, then the events after it) and saves the
events its commands triggered, atomically and only if nobody else appended meanwhile.
State is copied into and out of snapshots by `Aggregate.snapshot_state` and
`Aggregate.restore_state`: by default every public attribute, which must be JSON values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from .errors import AggregateNotFoundError, EventDefinitionError, InvalidAggregateIdError, SnapshotStoreError
from .handlers import handler_table
from .snapshots import Snapshot, SnapshotStore
from .store import AppendResult, EventStore, check_token

__all__ = ["Aggregate", "LoadInfo", "Repository"]

log = logging.getLogger("pigeon.es")

A = TypeVar("A", bound="Aggregate")


@dataclass(frozen=True, slots=True)
class LoadInfo:
    """How an aggregate was loaded: from which snapshot version (None: none) and how many
    events were replayed on top of it."""

    snapshot_version: int | None
    replayed: int


class Aggregate:
    """Base of aggregates. ``type_name`` names it in subjects (default: the class name);
    ``snapshot_every`` (None: never) and ``snapshot_version`` (bump it when the state's shape
    changes: older snapshots are then ignored) configure snapshots."""

    type_name: ClassVar[str]
    snapshot_every: ClassVar[int | None] = None
    snapshot_version: ClassVar[int] = 1
    _appliers: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        check_token("aggregate type", cls.type_name)
        every = cls.snapshot_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise EventDefinitionError(
                f"{cls.__qualname__}.snapshot_every must be a positive integer or None, not {every!r}"
            )
        cls._appliers = handler_table(cls)

    def __init__(self, id: str) -> None:
        if type(self) is Aggregate:
            raise EventDefinitionError("Aggregate is a base class: subclass it")
        try:
            check_token("aggregate id", id)
        except InvalidAggregateIdError as exc:
            raise InvalidAggregateIdError(f"{type(self).__name__}: {exc}") from None
        self.id = id
        self.version = 0
        self._pending: list[object] = []
        self._load_info = LoadInfo(None, 0)

    @classmethod
    def event_classes(cls) -> tuple[type, ...]:
        return tuple(cls._appliers)

    @property
    def pending(self) -> tuple[object, ...]:
        """Events triggered since the aggregate was loaded or saved."""
        return tuple(self._pending)

    @property
    def load_info(self) -> LoadInfo:
        return self._load_info

    def trigger(self, event: object) -> None:
        """Apply a new event and keep it for the next `Repository.save`."""
        self.apply(event)
        self._pending.append(event)

    def apply(self, event: object) -> None:
        """Change the state by one event (its applier) and count it."""
        method = self._appliers.get(type(event))
        if method is None:
            raise EventDefinitionError(
                f"{type(self).__qualname__} has no @handles method for {type(event).__qualname__}"
            )
        getattr(self, method)(event)
        self.version += 1

    def snapshot_state(self) -> dict[str, Any]:
        """The state to snapshot: by default every public attribute but ``id`` and ``version``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("id", "version")}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class Repository(Generic[A]):
    """Loads and saves aggregates of one class through an event store (and a snapshot store)."""

    def __init__(
        self,
        store: EventStore,
        aggregate: type[A],
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        if not (isinstance(aggregate, type) and issubclass(aggregate, Aggregate)):
            raise EventDefinitionError(f"a repository needs an Aggregate subclass, not {aggregate!r}")
        every = aggregate.snapshot_every if snapshot_every is None else snapshot_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise EventDefinitionError(f"snapshot_every must be a positive integer or None, not {every!r}")
        self.store = store
        self.aggregate = aggregate
        self.snapshots = snapshots
        self.snapshot_every = every
        store.registry.register(*aggregate.event_classes())

    async def load(self, id: str, *, at_version: int | None = None, at_time: float | None = None) -> A:
        """The aggregate now, or as it was at a version or at a time (seconds since the epoch)."""
        aggregate = self.aggregate(id)
        type_name = self.aggregate.type_name
        snapshot = await self._snapshot_for(id, at_version, at_time)
        if snapshot is not None:
            aggregate.restore_state(snapshot.state)
            aggregate.version = snapshot.version
        events = await self.store.read(
            type_name, id, after_version=aggregate.version, upto_version=at_version, upto_time=at_time
        )
        for recorded in events:
            aggregate.apply(recorded.event)
        if aggregate.version == 0:
            when = "" if at_version is None and at_time is None else " at that point"
            raise AggregateNotFoundError(f"{type_name} {id!r} has no events{when}")
        aggregate._load_info = LoadInfo(None if snapshot is None else snapshot.version, len(events))
        return aggregate

    async def _snapshot_for(self, id: str, at_version: int | None, at_time: float | None) -> Snapshot | None:
        if self.snapshots is None:
            return None
        snapshot = await self.snapshots.latest(
            self.aggregate.type_name, id, at_version=at_version, at_time=at_time
        )
        if snapshot is None or snapshot.state_version != self.aggregate.snapshot_version:
            return None  # made for another shape of the state: replaying is always correct
        return snapshot

    async def save(self, aggregate: A, *, metadata: Mapping[str, str] | None = None) -> AppendResult | None:
        """Append the pending events (None when there are none); `AggregateConflictError` when
        another writer appended since the aggregate was loaded: load it again and retry."""
        if not isinstance(aggregate, self.aggregate):
            raise EventDefinitionError(f"this repository saves {self.aggregate.__name__}, not {aggregate!r}")
        pending = aggregate._pending
        if not pending:
            return None
        before = aggregate.version - len(pending)
        result = await self.store.append(
            self.aggregate.type_name, aggregate.id, pending, expected_version=before, metadata=metadata
        )
        aggregate._pending = []
        every = self.snapshot_every
        if self.snapshots is not None and every is not None and result.version // every > before // every:
            try:
                await self.snapshot(aggregate, result)
            except SnapshotStoreError as exc:
                # The events are stored: the command succeeded. A missing snapshot only makes
                # the next load replay more.
                log.warning(
                    "snapshot of %s %s at version %d failed: %s",
                    self.aggregate.type_name,
                    aggregate.id,
                    result.version,
                    exc,
                )
        return result

    async def snapshot(self, aggregate: A, saved: AppendResult | None = None) -> Snapshot:
        """Store a snapshot of a saved aggregate (``saved``: its last append, when known)."""
        if self.snapshots is None:
            raise SnapshotStoreError(f"the repository of {self.aggregate.__name__} has no snapshot store")
        if aggregate._pending:
            raise SnapshotStoreError(
                f"{self.aggregate.__name__} {aggregate.id!r} has unsaved events: save it first"
            )
        if saved is None:
            events = await self.store.read_stored(
                self.aggregate.type_name,
                aggregate.id,
                after_version=aggregate.version - 1,
                upto_version=aggregate.version,
            )
            if not events:
                raise AggregateNotFoundError(f"{self.aggregate.__name__} {aggregate.id!r} is not stored")
            timestamp = events[-1].timestamp
        else:
            timestamp = self.store.timestamp(saved.last)
        snapshot = Snapshot(
            self.aggregate.type_name,
            aggregate.id,
            aggregate.version,
            timestamp,
            self.aggregate.snapshot_version,
            aggregate.snapshot_state(),
        )
        await self.snapshots.save(snapshot)
        return snapshot
