"""The event store on the embedded engine: atomic appends, conflicts, per-aggregate reads,
the global order, upcasting, and refusals for what cannot work."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from pigeon.engine import Engine, StreamConfig
from pigeon.errors import ConcurrencyConflictError, InvalidConfigError, UnsupportedFeatureError
from pigeon.es import (
    AggregateConflictError,
    EventDecodeError,
    EventDefinitionError,
    EventEncodeError,
    EventRegistry,
    EventStore,
    InvalidAggregateIdError,
    UnknownEventTypeError,
    UpcastError,
    domain_event,
)
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.memory import MemoryTransport


@domain_event("Opened")
@dataclass(frozen=True)
class Opened:
    owner: str


@domain_event("Deposited")
@dataclass(frozen=True)
class Deposited:
    amount: int


@pytest.fixture
async def engine(data_dir: Path):  # type: ignore[no-untyped-def]
    engine = await Engine.open(data_dir)
    yield engine
    await engine.close()


@pytest.fixture
async def store(engine: Engine) -> EventStore:
    return await EventStore.open(engine, unique_name("es"), registry=EventRegistry([Opened, Deposited]))


async def test_append_and_read_back_in_order(store: EventStore) -> None:
    first = await store.append("Account", "a1", [Opened("ann"), Deposited(5)], expected_version=0)
    assert first.version == 2 and first.last.offset == first.first.offset + 1
    await store.append("Account", "b2", [Opened("bob")], expected_version=0)
    await store.append("Account", "a1", [Deposited(7)], expected_version=2)
    events = await store.read("Account", "a1")
    assert [e.event for e in events] == [Opened("ann"), Deposited(5), Deposited(7)]
    assert [e.version for e in events] == [1, 2, 3]
    assert store.version("Account", "a1") == 3 and store.version("Account", "zz") == 0
    assert [e.event for e in await store.read("Account", "a1", after_version=1)] == [
        Deposited(5),
        Deposited(7),
    ]
    assert [e.version for e in await store.read("Account", "a1", upto_version=2)] == [1, 2]
    assert await store.read("Account", "nobody") == []


async def test_a_stale_writer_gets_a_conflict_and_writes_nothing(store: EventStore) -> None:
    await store.append("Account", "a1", [Opened("ann")], expected_version=0)
    await store.append("Account", "a1", [Deposited(1)], expected_version=1)
    with pytest.raises(AggregateConflictError) as caught:
        await store.append("Account", "a1", [Deposited(2), Deposited(3)], expected_version=1)
    assert caught.value.expected == 1 and caught.value.actual == 2
    assert isinstance(caught.value, ConcurrencyConflictError)
    assert "load it again" in str(caught.value)
    with pytest.raises(AggregateConflictError):
        await store.append("Account", "a1", [Opened("again")], expected_version=0)
    assert [e.version for e in await store.read("Account", "a1")] == [1, 2]
    assert sum(store.end()) == 2


async def test_concurrent_writers_one_wins(store: EventStore) -> None:
    await store.append("Account", "a1", [Opened("ann")], expected_version=0)
    results = await asyncio.gather(
        *(store.append("Account", "a1", [Deposited(i)], expected_version=1) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, AggregateConflictError) for r in results if isinstance(r, BaseException))
    assert store.version("Account", "a1") == 2


async def test_read_all_is_the_global_order(store: EventStore) -> None:
    for i in range(3):
        await store.append("Account", f"a{i}", [Opened(f"o{i}")], expected_version=0)
    await store.append("Account", "a0", [Deposited(1)], expected_version=1)
    seen = [(e.aggregate_id, e.version, e.position.offset) async for e in store.read_all()]
    assert seen == [("a0", 1, 0), ("a1", 1, 1), ("a2", 1, 2), ("a0", 2, 3)]
    later = [e.position.offset async for e in store.read_all(from_offset=2)]
    assert later == [2, 3]


async def test_long_history_with_multi_event_commits(store: EventStore) -> None:
    await store.append("Account", "a1", [Opened("ann")], expected_version=0)
    version = 1
    for i in range(60):
        batch = [Deposited(i)] * (1 + i % 3)
        await store.append(
            "Account", "other", [Opened("x")] if i == 0 else [Deposited(0)], expected_version=i
        )
        version = (await store.append("Account", "a1", batch, expected_version=version)).version
    events = await store.read("Account", "a1")
    assert [e.version for e in events] == list(range(1, version + 1))
    assert [e.version for e in await store.read("Account", "a1", after_version=50, upto_version=55)] == [
        51,
        52,
        53,
        54,
        55,
    ]


async def test_metadata_round_trips_and_cannot_forge_own_headers(store: EventStore) -> None:
    await store.append("Account", "a1", [Opened("ann")], expected_version=0, metadata={"user": "u7"})
    (event,) = await store.read("Account", "a1")
    assert event.metadata == {"user": "u7"}
    with pytest.raises(InvalidConfigError, match="own headers"):
        await store.append(
            "Account", "a1", [Deposited(1)], expected_version=1, metadata={"Pigeon-Es-Version": "9"}
        )


async def test_user_mistakes_get_specific_errors(engine: Engine, store: EventStore) -> None:
    with pytest.raises(InvalidAggregateIdError, match="subject token"):
        await store.append("Account", "a.b", [Opened("x")], expected_version=0)
    with pytest.raises(InvalidAggregateIdError):
        await store.append("Acc ount", "a", [Opened("x")], expected_version=0)
    with pytest.raises(InvalidConfigError, match="at least one event"):
        await store.append("Account", "a", [], expected_version=0)
    with pytest.raises(InvalidConfigError, match="expected_version"):
        await store.append("Account", "a", [Opened("x")], expected_version=-1)

    @dataclass
    class Unregistered:
        x: int

    with pytest.raises(UnknownEventTypeError, match="not registered"):
        await store.append("Account", "a", [Unregistered(1)], expected_version=0)

    @domain_event("Weird")
    @dataclass
    class Weird:
        value: object

    store.registry.register(Weird)
    with pytest.raises(EventEncodeError, match="JSON"):
        await store.append("Account", "a", [Weird(object())], expected_version=0)
    with pytest.raises(EventDefinitionError, match="dataclass or a pydantic"):
        domain_event("X")(int)
    with pytest.raises(EventDefinitionError, match="registered already"):

        @domain_event("Opened")
        @dataclass
        class AlsoOpened:
            owner: str

        store.registry.register(AlsoOpened)
    assert sum(store.end()) == 0


async def test_a_stream_with_limits_or_other_subjects_is_refused(engine: Engine) -> None:
    name = unique_name("lim")
    await engine.create_stream(StreamConfig(name, (f"{name}.>",), max_msgs=10))
    with pytest.raises(InvalidConfigError, match="keeps every event"):
        await EventStore.open(engine, name)
    other = unique_name("oth")
    await engine.create_stream(StreamConfig(other, (f"{other}.x",)))
    with pytest.raises(InvalidConfigError, match="event store layout"):
        await EventStore.open(engine, other)


async def test_a_transport_without_expectations_is_refused_naming_the_alternative() -> None:
    transport = await connect(require_service("redis"))
    try:
        with pytest.raises(UnsupportedFeatureError, match="embedded engine") as caught:
            await EventStore.for_transport(transport)
        assert caught.value.backend == "redis"
    finally:
        await transport.close()


@pytest.mark.parametrize("kind", ["memory", "embedded"])
async def test_the_memory_and_embedded_transports_are_accepted(kind: str, data_dir: Path) -> None:
    # memory:// is the engine too (on a temporary folder), so it has the expectations.
    transport = await (
        MemoryTransport.open("memory://") if kind == "memory" else connect(f"file://{data_dir}")
    )
    try:
        store = await EventStore.for_transport(transport, unique_name("es"), registry=EventRegistry([Opened]))
        await store.append("Account", "a", [Opened("x")], expected_version=0)
        assert store.version("Account", "a") == 1
    finally:
        await transport.close()


async def test_events_survive_a_restart(data_dir: Path) -> None:
    name = unique_name("es")
    async with await Engine.open(data_dir) as engine:
        store = await EventStore.open(engine, name, registry=EventRegistry([Opened, Deposited]))
        await store.append("Account", "a", [Opened("x"), Deposited(1)], expected_version=0)
        await store.append("Account", "a", [Deposited(2)], expected_version=2)
    async with await Engine.open(data_dir) as engine:
        store = await EventStore.open(engine, name, registry=EventRegistry([Opened, Deposited]))
        assert [e.version for e in await store.read("Account", "a")] == [1, 2, 3]
        with pytest.raises(AggregateConflictError):
            await store.append("Account", "a", [Deposited(3)], expected_version=2)


# -- upcasting ------------------------------------------------------------------------------------


async def test_old_event_versions_are_upcast_on_read(engine: Engine) -> None:
    name = unique_name("es")

    @domain_event("Moved", version=1)
    @dataclass
    class MovedV1:
        city: str

    old = await EventStore.open(engine, name, registry=EventRegistry([MovedV1]))
    await old.append("Person", "p", [MovedV1("Paris")], expected_version=0)

    @domain_event("Moved", version=3)
    @dataclass
    class Moved:
        city: str
        country: str
        postcode: str | None

    registry = EventRegistry([Moved])

    @registry.upcaster("Moved", from_version=1)
    def add_country(data: dict[str, object]) -> dict[str, object]:
        return {**data, "country": "unknown"}

    @registry.upcaster("Moved", from_version=2)
    def add_postcode(data: dict[str, object]) -> dict[str, object]:
        return {**data, "postcode": None}

    new = EventStore(engine, name, registry)
    await new.append("Person", "p", [Moved("Lyon", "FR", "69001")], expected_version=1)
    events = [e.event for e in await new.read("Person", "p")]
    assert events == [Moved("Paris", "unknown", None), Moved("Lyon", "FR", "69001")]
    stored = await new.read_stored("Person", "p")
    assert [s.schema_version for s in stored] == [1, 3]  # the log is never rewritten

    missing = EventRegistry([Moved])
    with pytest.raises(UpcastError, match="from version 1 to 2"):
        await EventStore(engine, name, missing).read("Person", "p")
    with pytest.raises(UpcastError, match="newer than this code"):
        await EventStore(engine, name, EventRegistry([MovedV1])).read("Person", "p")
    with pytest.raises(UnknownEventTypeError, match="'Moved'"):
        await EventStore(engine, name, EventRegistry()).read("Person", "p")
    with pytest.raises(EventDefinitionError, match="upcaster from version 1 already"):
        registry.upcaster("Moved", from_version=1)(add_country)


async def test_an_event_that_no_longer_fits_its_class_is_a_decode_error(engine: Engine) -> None:
    name = unique_name("es")

    @domain_event("Renamed")
    @dataclass
    class RenamedOld:
        name: str

    await (await EventStore.open(engine, name, registry=EventRegistry([RenamedOld]))).append(
        "Person", "p", [RenamedOld("x")], expected_version=0
    )

    @domain_event("Renamed")
    @dataclass
    class Renamed:
        first: str

    with pytest.raises(EventDecodeError, match="does not fit"):
        await EventStore(engine, name, EventRegistry([Renamed])).read("Person", "p")


async def test_pydantic_events(engine: Engine) -> None:
    pydantic = pytest.importorskip("pydantic")
    from datetime import datetime
    from decimal import Decimal

    @domain_event("Paid")
    class Paid(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        amount: Decimal
        at: datetime

    store = await EventStore.open(engine, unique_name("es"), registry=EventRegistry([Paid]))
    paid = Paid(amount=Decimal("10.25"), at=datetime(2026, 1, 2, 3, 4, 5))
    await store.append("Invoice", "i1", [paid], expected_version=0)
    (event,) = await store.read("Invoice", "i1")
    assert event.event == paid
