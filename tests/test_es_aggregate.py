"""Aggregates and repositories: commands, appliers, saving with conflicts, snapshots (folder
and engine) with bounded replays, and time travel by version and by time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pigeon.engine import Engine
from pigeon.es import (
    Aggregate,
    AggregateConflictError,
    AggregateNotFoundError,
    EngineSnapshotStore,
    EventDefinitionError,
    EventStore,
    FolderSnapshotStore,
    InvalidAggregateIdError,
    Repository,
    Snapshot,
    SnapshotStore,
    SnapshotStoreError,
    domain_event,
    handles,
)
from pigeon.testing.services import unique_name


@domain_event("CounterStarted")
@dataclass(frozen=True)
class Started:
    name: str


@domain_event("CounterAdded")
@dataclass(frozen=True)
class Added:
    amount: int


class Counter(Aggregate):
    name = ""
    total = 0
    history: list[int]

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.history = []

    @classmethod
    def start(cls, id: str, name: str) -> Counter:
        counter = cls(id)
        counter.trigger(Started(name))
        return counter

    def add(self, amount: int) -> None:
        if amount <= 0:
            raise ValueError("add a positive amount")
        self.trigger(Added(amount))

    @handles(Started)
    def _started(self, event: Started) -> None:
        self.name = event.name

    @handles(Added)
    def _added(self, event: Added) -> None:
        self.total += event.amount
        self.history = [*self.history[-4:], event.amount]


@pytest.fixture
async def engine(data_dir: Path):  # type: ignore[no-untyped-def]
    engine = await Engine.open(data_dir)
    yield engine
    await engine.close()


@pytest.fixture
async def store(engine: Engine) -> EventStore:
    return await EventStore.open(engine, unique_name("es"), durability="never")


async def test_commands_events_and_rebuilding(store: EventStore) -> None:
    repo = Repository(store, Counter)
    counter = Counter.start("c1", "visits")
    counter.add(2)
    counter.add(3)
    assert counter.version == 3 and len(counter.pending) == 3
    result = await repo.save(counter)
    assert result is not None and result.version == 3 and counter.pending == ()
    assert await repo.save(counter) is None
    loaded = await repo.load("c1")
    assert (loaded.name, loaded.total, loaded.version, loaded.history) == ("visits", 5, 3, [2, 3])
    assert loaded.load_info.snapshot_version is None and loaded.load_info.replayed == 3
    with pytest.raises(ValueError, match="positive"):
        loaded.add(0)
    assert loaded.pending == ()


async def test_two_writers_of_one_aggregate(store: EventStore) -> None:
    repo = Repository(store, Counter)
    await repo.save(Counter.start("c1", "x"))
    first, second = await repo.load("c1"), await repo.load("c1")
    first.add(1)
    second.add(10)
    await repo.save(first)
    with pytest.raises(AggregateConflictError, match="load it again"):
        await repo.save(second)
    assert (await repo.load("c1")).total == 1
    again = await repo.load("c1")
    again.add(10)
    await repo.save(again)
    assert (await repo.load("c1")).total == 11


async def test_not_found_and_bad_definitions(store: EventStore) -> None:
    repo = Repository(store, Counter)
    with pytest.raises(AggregateNotFoundError, match="has no events"):
        await repo.load("nobody")
    with pytest.raises(InvalidAggregateIdError, match="Counter"):
        Counter("a/b")
    with pytest.raises(EventDefinitionError, match="Aggregate subclass"):
        Repository(store, int)  # type: ignore[type-var]

    class Forgetful(Aggregate):
        pass

    with pytest.raises(EventDefinitionError, match="no @handles method for Added"):
        Forgetful("f").trigger(Added(1))
    with pytest.raises(EventDefinitionError, match="twice"):

        class Twice(Aggregate):
            @handles(Added)
            def a(self, event: Added) -> None: ...

            @handles(Added)
            def b(self, event: Added) -> None: ...

    with pytest.raises(EventDefinitionError, match="snapshot_every"):

        class Bad(Aggregate):
            snapshot_every = 0

    with pytest.raises(SnapshotStoreError, match="no snapshot store"):
        await repo.snapshot(Counter("c"))


async def test_time_travel_by_version_and_by_time(store: EventStore) -> None:
    repo = Repository(store, Counter)
    counter = Counter.start("c1", "x")
    await repo.save(counter)
    times = []
    for amount in (1, 2, 4):
        await asyncio.sleep(0.01)  # distinct append times
        counter.add(amount)
        await repo.save(counter)
        times.append(time.time())
    assert (await repo.load("c1", at_version=2)).total == 1
    assert (await repo.load("c1", at_version=3)).total == 3
    assert (await repo.load("c1", at_time=times[0])).total == 1
    assert (await repo.load("c1", at_time=times[1])).total == 3
    assert (await repo.load("c1", at_time=times[2] + 60)).total == 7
    with pytest.raises(AggregateNotFoundError, match="at that point"):
        await repo.load("c1", at_time=0)


async def _fill(repo: Repository[Counter], id: str, adds: int, per_commit: int = 1) -> Counter:
    counter = Counter.start(id, "n")
    await repo.save(counter)
    for i in range(adds):
        counter.add(i + 1)
        if (i + 1) % per_commit == 0:
            await repo.save(counter)
    await repo.save(counter)
    return counter


@pytest.fixture(params=["folder", "engine"])
async def snapshots(request: pytest.FixtureRequest, engine: Engine, tmp_path: Path) -> SnapshotStore:
    if request.param == "folder":
        return FolderSnapshotStore(tmp_path / "snapshots")
    return await EngineSnapshotStore.open(engine, unique_name("snap"))


async def test_snapshots_bound_the_replay_however_long_the_history(
    store: EventStore, snapshots: SnapshotStore
) -> None:
    repo = Repository(store, Counter, snapshots=snapshots, snapshot_every=10)
    for length in (30, 300, 1500):
        id = f"c{length}"
        written = await _fill(repo, id, length, per_commit=3)
        loaded = await repo.load(id)
        assert (loaded.total, loaded.version, loaded.history) == (
            written.total,
            written.version,
            written.history,
        )
        assert loaded.load_info.snapshot_version is not None
        assert loaded.load_info.replayed < 10 + 3  # at most one interval plus one commit
    without = await Repository(store, Counter).load("c1500")
    assert without.load_info.replayed == 1501 and without.total == written.total


async def test_time_travel_uses_an_older_snapshot_when_kept(store: EventStore, tmp_path: Path) -> None:
    repo = Repository(store, Counter, snapshots=FolderSnapshotStore(tmp_path / "s"), snapshot_every=10)
    await _fill(repo, "c", 45)
    old = await repo.load("c", at_version=25)
    assert old.version == 25 and old.total == sum(range(1, 25))
    assert old.load_info.snapshot_version == 20 and old.load_info.replayed == 5


async def test_engine_snapshots_keep_the_latest_only(store: EventStore, engine: Engine) -> None:
    repo = Repository(
        store, Counter, snapshots=await EngineSnapshotStore.open(engine, unique_name("s")), snapshot_every=10
    )
    await _fill(repo, "c", 45)
    old = await repo.load("c", at_version=25)
    assert old.total == sum(range(1, 25))
    assert old.load_info.snapshot_version is None and old.load_info.replayed == 25


async def test_a_snapshot_of_another_state_version_is_ignored(store: EventStore, tmp_path: Path) -> None:
    folder = FolderSnapshotStore(tmp_path / "s")
    await _fill(Repository(store, Counter, snapshots=folder, snapshot_every=5), "c", 12)

    class CounterV2(Counter):
        type_name = "Counter"
        snapshot_version = 2

    loaded = await Repository(store, CounterV2, snapshots=folder).load("c")
    assert loaded.load_info.snapshot_version is None and loaded.total == sum(range(1, 13))


async def test_folder_store_keeps_the_newest_and_reports_damage(tmp_path: Path) -> None:
    folder = FolderSnapshotStore(tmp_path / "s", keep=2)
    for version in (10, 20, 30):
        await folder.save(Snapshot("Counter", "c", version, time.time(), 1, {"total": version}))
    assert sorted(p.name for p in (tmp_path / "s" / "Counter" / "c").iterdir()) == [
        "00000000000000000020.json",
        "00000000000000000030.json",
    ]
    assert (await folder.latest("Counter", "c", at_version=25)) is not None
    assert (await folder.latest("Counter", "c", at_version=15)) is None
    (tmp_path / "s" / "Counter" / "c" / "00000000000000000030.json").write_text("{not json")
    with pytest.raises(SnapshotStoreError, match="cannot be read"):
        await folder.latest("Counter", "c")
    with pytest.raises(SnapshotStoreError, match="not JSON"):
        await folder.save(Snapshot("Counter", "c", 40, 0.0, 1, {"x": object()}))
    with pytest.raises(InvalidAggregateIdError):
        await folder.latest("Counter", "..")


async def test_a_failing_snapshot_store_does_not_fail_the_command(
    store: EventStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("a file where the snapshot folder should be")
    repo = Repository(store, Counter, snapshots=FolderSnapshotStore(tmp_path / "file"), snapshot_every=2)
    counter = await _fill(repo, "c", 3)
    assert (await Repository(store, Counter).load("c")).total == counter.total
    assert "cannot write a snapshot" in caplog.text
