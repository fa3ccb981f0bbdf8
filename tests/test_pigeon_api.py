"""`$PIGEON.API` on `pigeon serve`, spoken directly with nats-py: every request, its errors,
members tied to their connection, and publishes reaching core subscribers exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from pigeon import errors, wire
from pigeon.engine.config import StartAt
from pigeon.engine.groups.config import Backoff
from pigeon.errors import (
    AlreadySettledError,
    InvalidMessageError,
    MemberNotFoundError,
    StreamExistsError,
    StreamNotFoundError,
)
from pigeon.message import Message
from pigeon.server.serve import Running, ServeOptions, running
from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.nats._pigeon import PigeonServeTransport


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with running(ServeOptions(data=tmp_path / "data", port=0, http_port=0)) as parts:
        yield parts


@pytest.fixture
async def nc(served: Running) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(served.nats.url)
    yield client
    await client.close()


async def call(nc: nats.NATS, operation: str, body: Any = None, payload: bytes | None = None) -> Any:
    data = payload if payload is not None else json.dumps(body or {}).encode()
    reply = await nc.request(wire.API + operation, data, timeout=5)
    if reply.headers and "Pigeon-Records" in reply.headers:
        return wire.decode_records(reply.data)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise wire.error_from_json(answer["error"])
    return answer


async def make_stream(nc: nats.NATS, partitions: int = 1) -> tuple[str, str]:
    name = unique_name("api")
    prefix = name.replace("-", "_")
    await call(nc, "STREAM.CREATE", {"name": name, "subjects": [f"{prefix}.>"], "partitions": partitions})
    return name, prefix


async def publish(nc: nats.NATS, *messages: Message) -> list[Any]:
    answer = await call(nc, "PUB", payload=wire.encode_records([wire.Record(m) for m in messages]))
    return list(answer["acks"])


async def test_info_names_pigeon(nc: nats.NATS) -> None:
    info = await call(nc, "INFO")
    assert info["server"] == "pigeon" and info["api"] == wire.PROTOCOL_VERSION
    assert {"partitions", "ordered_groups", "dead_letters"} <= set(info["capabilities"])


async def test_streams_create_state_list_purge_delete(nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc, partitions=3)
    await make_stream(nc)  # another, for the list
    # Creating it again the same way is a no-op; differently is refused.
    await call(nc, "STREAM.CREATE", {"name": name, "subjects": [f"{prefix}.>"], "partitions": 3})
    with pytest.raises(StreamExistsError):
        await call(nc, "STREAM.CREATE", {"name": name, "subjects": [f"{prefix}.>"], "partitions": 2})
    acks = await publish(nc, *(Message(f"{prefix}.o", b"x", key=f"k{i}") for i in range(30)))
    assert {a["partition"] for a in acks} == {0, 1, 2}
    state = await call(nc, "STREAM.STATE", {"name": name})
    assert state["partitions"] == 3 and state["messages"] == 30
    assert sum(o + 1 for o in state["last_offsets"]) == 30
    assert name in (await call(nc, "STREAM.LIST"))["streams"]
    await call(nc, "STREAM.PURGE", {"name": name})
    assert (await call(nc, "STREAM.STATE", {"name": name}))["messages"] == 0
    await call(nc, "STREAM.DELETE", {"name": name})
    with pytest.raises(StreamNotFoundError):
        await call(nc, "STREAM.STATE", {"name": name})


async def test_a_keyed_publish_keeps_its_key_and_partition(nc: nats.NATS) -> None:
    _, prefix = await make_stream(nc, partitions=4)
    first = await publish(nc, *(Message(f"{prefix}.o", str(i).encode(), key="same") for i in range(5)))
    assert len({a["partition"] for a in first}) == 1
    assert [a["offset"] for a in first] == list(range(5))
    duplicate = await publish(
        nc, Message(f"{prefix}.o", b"a", id="id-1"), Message(f"{prefix}.o", b"b", id="id-1")
    )
    assert not duplicate[0].get("duplicate") and duplicate[1]["duplicate"] is True
    assert await publish(nc, Message("nobody.captures.this", b"x")) == [None]


async def test_a_publish_reaches_core_subscribers_once_and_a_duplicate_not_at_all(nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc)
    got: list[Any] = []

    async def receive(msg: Any) -> None:
        got.append(msg)

    sub = await nc.subscribe(f"{prefix}.>", cb=receive)
    await nc.flush()
    await publish(nc, Message(f"{prefix}.a", b"one", key="k", headers={"h": "v"}, id="dup"))
    await publish(nc, Message(f"{prefix}.a", b"one", key="k", id="dup"))
    await asyncio.sleep(0.3)
    assert len(got) == 1
    assert got[0].data == b"one" and got[0].headers["h"] == "v" and got[0].headers["Pigeon-Key"] == "k"
    assert (await call(nc, "STREAM.STATE", {"name": name}))["messages"] == 1  # stored once, not twice
    await sub.unsubscribe()


async def test_a_one_message_publish_names_its_subject_key_and_id_in_headers(nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc, partitions=4)
    got: list[Any] = []

    async def receive(msg: Any) -> None:
        got.append(msg)

    sub = await nc.subscribe(f"{prefix}.>", cb=receive)
    await nc.flush()
    headers = {"Pigeon-Subject": f"{prefix}.a", "Pigeon-Key": "k1", "Nats-Msg-Id": "one", "h": "v"}
    first = await nc.request(wire.API + "PUB", b"payload", headers=headers, timeout=5)
    ack = json.loads(first.data)
    assert ack["stream"] == name and ack["offset"] == 0 and ack["duplicate"] is False
    again = json.loads((await nc.request(wire.API + "PUB", b"payload", headers=headers, timeout=5)).data)
    assert again == {**ack, "duplicate": True}
    uncaptured = {"Pigeon-Subject": "nobody.captures.this"}
    assert json.loads((await nc.request(wire.API + "PUB", b"x", headers=uncaptured, timeout=5)).data) == {
        "stored": False
    }
    # The key routes it like a records publish with the same key.
    (same,) = await publish(nc, Message(f"{prefix}.a", b"other", key="k1"))
    assert same["partition"] == ack["partition"]
    await asyncio.sleep(0.3)
    assert [m.data for m in got] == [b"payload", b"other"]
    assert got[0].headers["h"] == "v" and got[0].headers["Pigeon-Key"] == "k1"
    assert "Pigeon-Subject" not in got[0].headers and got[0].subject == f"{prefix}.a"
    state = await call(nc, "STREAM.STATE", {"name": name})
    assert state["messages"] == 2
    await sub.unsubscribe()


async def test_a_member_that_left_is_not_found_and_a_deleted_stream_takes_its_dead_letters(
    nc: nats.NATS,
) -> None:
    name, prefix = await make_stream(nc)
    await publish(nc, Message(f"{prefix}.o", b"poison"))
    spec = {"group": "g", "kind": "shared", "max_deliver": 1}
    member = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec}))["member"]
    (record,) = await call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 2})
    where = {"partition": record.message.partition, "offset": record.message.offset}
    await call(nc, "ACK", {"member": member, "op": "term", **where})
    streams = set((await call(nc, "STREAM.LIST"))["streams"])
    letters = streams - {name}
    assert any(name in s for s in letters), streams  # the group's dead-letter stream exists
    await call(nc, "GROUP.LEAVE", {"member": member})
    await call(nc, "GROUP.LEAVE", {"member": member})  # leaving twice is harmless
    with pytest.raises(MemberNotFoundError):
        await call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 0})
    with pytest.raises(MemberNotFoundError):
        await call(nc, "ACK", {"member": member, "op": "ack", **where})
    await call(nc, "STREAM.DELETE", {"name": name})
    after = set((await call(nc, "STREAM.LIST"))["streams"])
    assert not after & (letters | {name})


async def test_a_single_partition_stream_made_here_is_a_jetstream_stream(nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc)
    js = nc.jetstream()
    ack = await js.publish(f"{prefix}.x", b"from jetstream")
    assert ack.stream == name and ack.seq == 1
    assert (await js.stream_info(name)).state.messages == 1
    await call(nc, "STREAM.DELETE", {"name": name})
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(name)


async def test_fetch_ack_nack_term_and_dead_letters(nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc)
    await publish(nc, *(Message(f"{prefix}.o", str(i).encode()) for i in range(3)))
    spec = {"group": "g", "kind": "shared", "max_deliver": 2, "ack_wait_s": 30}
    member = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec, "member": "one"}))["member"]
    records = await call(nc, "GROUP.FETCH", {"member": member, "batch": 10, "expires_s": 1})
    assert [r.message.payload for r in records] == [b"0", b"1", b"2"]
    assert all(r.delivery_count == 1 for r in records)

    def settle(record: wire.Record, op: str, **extra: Any) -> Any:
        where = {"partition": record.message.partition, "offset": record.message.offset}
        return call(nc, "ACK", {"member": member, "op": op, **where, **extra})

    await settle(records[0], "ack")
    with pytest.raises(AlreadySettledError):
        await settle(records[0], "ack")
    await settle(records[1], "nack", delay=0, error={"type": "ValueError", "message": "bad"})
    await settle(records[2], "term", error={"type": "Reject", "message": "refused"})
    again = await call(nc, "GROUP.FETCH", {"member": member, "batch": 10, "expires_s": 2})
    assert [(r.message.payload, r.delivery_count) for r in again] == [(b"1", 2)]
    await settle(again[0], "nack", error={"type": "ValueError", "message": "still bad"})
    letters = []
    for _ in range(50):
        letters = await call(nc, "GROUP.DEAD_LETTERS", {"stream": name, "group": "g"})
        if len(letters) == 2:
            break
        await asyncio.sleep(0.05)
    by_payload = {r.message.payload: r.message.headers for r in letters}
    assert by_payload[b"2"]["Pigeon-Error-Type"] == "Reject"
    assert by_payload[b"1"]["Pigeon-Error-Type"] == "ValueError"
    lag = (await call(nc, "GROUP.LAG", {"stream": name, "group": "g"}))["partitions"]
    assert lag[0]["lag"] == 0 and lag[0]["head"] == 3
    await call(nc, "GROUP.DELETE", {"stream": name, "group": "g"})
    with pytest.raises(MemberNotFoundError):
        await call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 0})


async def test_a_member_leaves_when_its_connection_ends(served: Running, nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc)
    await publish(nc, Message(f"{prefix}.o", b"only"))
    other = await nats.connect(served.nats.url)
    spec = {"group": "g", "kind": "shared", "ack_wait_s": 60}
    doomed = (await call(other, "GROUP.JOIN", {"stream": name, "spec": spec, "member": "a"}))["member"]
    taken = await call(other, "GROUP.FETCH", {"member": doomed, "batch": 1, "expires_s": 1})
    assert len(taken) == 1
    await other.close()  # without settling: the message must not wait 60 s for its lease
    member = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec, "member": "b"}))["member"]
    again = await call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 5})
    assert [(r.message.payload, r.delivery_count) for r in again] == [(b"only", 2)]


async def test_ordered_groups_split_partitions_between_connections(served: Running, nc: nats.NATS) -> None:
    name, prefix = await make_stream(nc, partitions=2)
    await publish(nc, *(Message(f"{prefix}.o", str(i).encode(), key=f"k{i}") for i in range(20)))
    other = await nats.connect(served.nats.url)
    spec = {"group": "o", "kind": "ordered"}
    a = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec, "member": "a"}))["member"]
    b = (await call(other, "GROUP.JOIN", {"stream": name, "spec": spec, "member": "b"}))["member"]
    seen: dict[str, set[int]] = {}
    for client, member in ((nc, a), (other, b)):
        records = await call(client, "GROUP.FETCH", {"member": member, "batch": 100, "expires_s": 2})
        seen[member] = {r.message.partition for r in records}
    assert seen[a] and seen[b] and not seen[a] & seen[b]
    await other.close()


async def test_a_header_publish_without_a_subject_is_refused(nc: nats.NATS) -> None:
    reply = await nc.request(wire.API + "PUB", b"x", headers={"Pigeon-Subject": ""}, timeout=5)
    assert json.loads(reply.data)["error"]["type"] in {"InvalidMessageError", "InvalidSubjectError"}
    reply = await nc.request(wire.API + "PUB", b"x", headers={"Pigeon-Subject": "a..b"}, timeout=5)
    assert json.loads(reply.data)["error"]["type"] == "InvalidSubjectError"


@pytest.mark.parametrize(
    ("operation", "payload"),
    [
        ("STREAM.CREATE", b"not json"),
        ("STREAM.CREATE", b"[1, 2]"),
        ("STREAM.CREATE", b'{"name": "x"}'),
        ("STREAM.STATE", b"{}"),
        ("GROUP.JOIN", b'{"stream": "nope", "spec": {"group": "g"}}'),
        ("GROUP.FETCH", b'{"member": "m999"}'),
        ("GROUP.FETCH", b"garbage"),
        ("ACK", b'{"member": "m999", "partition": 0, "offset": 0, "op": "ack"}'),
        ("PUB", b"\x00\x00\x00\x09garbage"),
        ("NO.SUCH.THING", b"{}"),
        ("STREAM.STATE", b'{"name": "x", "nmae": "x"}'),
        ("GROUP.JOIN", b'{"stream": "s", "spec": {"group": "g", "ack_wait": 5}}'),
        ("GROUP.JOIN", b'{"stream": "s", "spec": "g"}'),
        ("GROUP.JOIN", b'{"stream": "s", "spec": {"group": "g"}, "member": 7}'),
        ("GROUP.FETCH", b'{"member": "m1", "batch": 1, "timeout": 1}'),
        ("GROUP.FETCH", b'{"member": "m999", "batch": 0}'),
        ("ACK", b'{"member": "m999", "partition": 0, "offset": 0, "op": "ack", "why": 1}'),
        ("INFO", b'{"verbose": true}'),
    ],
)
async def test_bad_requests_get_a_specific_error(nc: nats.NATS, operation: str, payload: bytes) -> None:
    reply = await nc.request(wire.API + operation, payload, timeout=5)
    error = json.loads(reply.data)["error"]
    assert error["type"] != "PigeonError" or "internal" not in error["description"], error
    assert error["type"] in {
        "InvalidMessageError",
        "InvalidConfigError",
        "InvalidNameError",
        "StreamNotFoundError",
        "MemberNotFoundError",
    }, error
    assert (await call(nc, "INFO"))["server"] == "pigeon"  # still serving


async def test_the_nats_transport_finds_the_api_and_not_on_a_real_nats_server(served: Running) -> None:
    transport = await connect(served.nats.url)
    try:
        assert isinstance(transport, PigeonServeTransport)
        assert not transport.capabilities.emulated
    finally:
        await transport.close()
    real = await connect(require_service("nats"))
    try:
        assert not isinstance(real, PigeonServeTransport)
    finally:
        await real.close()


def test_records_round_trip_and_malformed_ones_are_refused() -> None:
    message = Message(
        "a.b", b"\x00\xff", key="k\u00e9", headers={"x": " y\r\n"}, id="i", stream="s", partition=1, offset=7
    )
    (back,) = wire.decode_records(wire.encode_records([wire.Record(message, 3)]))
    assert back.delivery_count == 3
    assert (back.message.subject, back.message.payload, back.message.key) == ("a.b", b"\x00\xff", "k\u00e9")
    assert back.message.headers == {"x": " y\r\n"} and back.message.id == "i"
    assert (back.message.stream, back.message.partition, back.message.offset) == ("s", 1, 7)
    with pytest.raises(InvalidMessageError):
        wire.decode_records(wire.encode_records([wire.Record(message)])[:-1])


def test_every_pigeon_error_and_config_value_round_trips() -> None:
    classes = [
        cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.PigeonError)
    ]
    assert len(classes) > 10
    for cls in classes:
        sent = wire.error_from_json({"type": cls.__name__, "description": "what went wrong"})
        assert type(sent) is cls
        back = wire.error_from_json(json.loads(wire.encode(wire.error_to_json(sent)))["error"])
        assert type(back) is cls and str(back) == str(sent)
    conflict = errors.ConcurrencyConflictError("no", expected=3, actual=4)
    back = wire.error_from_json(json.loads(wire.encode(wire.error_to_json(conflict)))["error"])
    assert isinstance(back, errors.ConcurrencyConflictError) and (back.expected, back.actual) == (3, 4)
    unsupported = errors.UnsupportedFeatureError("x", "partitions", "use file://")
    back = wire.error_from_json(wire.error_to_json(unsupported)["error"])
    assert isinstance(back, errors.UnsupportedFeatureError) and back.feature == "partitions"
    assert type(wire.error_from_json({"type": "SystemExit", "description": "no"})) is errors.PigeonError
    assert wire.error_to_json(KeyError("k"))["error"]["type"] == "PigeonError"  # not ours: generic
    for start in (StartAt.earliest(), StartAt.latest(), StartAt.offset(5), StartAt.time(12.5)):
        assert wire.start_from_json(json.loads(wire.encode(wire.start_to_json(start)))) == start
    backoff = Backoff(delays_s=(1.0, 2.5), jitter=0)
    assert wire.backoff_from_json(json.loads(wire.encode(wire.backoff_to_json(backoff)))) == backoff
    with pytest.raises(errors.InvalidConfigError):
        wire.backoff_from_json({"delay": 1})


async def test_a_waiting_fetch_is_answered_at_once_when_its_member_leaves_or_its_group_goes(
    nc: nats.NATS,
) -> None:
    name, _ = await make_stream(nc)
    spec = {"group": "g", "kind": "shared"}
    member = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec}))["member"]
    waiting = asyncio.create_task(call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 30}))
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    await call(nc, "GROUP.LEAVE", {"member": member})
    assert await waiting == []
    member = (await call(nc, "GROUP.JOIN", {"stream": name, "spec": spec}))["member"]
    waiting = asyncio.create_task(call(nc, "GROUP.FETCH", {"member": member, "batch": 1, "expires_s": 30}))
    await asyncio.sleep(0.2)
    await call(nc, "GROUP.DELETE", {"stream": name, "group": "g"})
    with pytest.raises(MemberNotFoundError):
        await waiting
    assert asyncio.get_running_loop().time() - started < 3  # not after the 30 s long poll


async def test_a_member_token_from_before_a_restart_names_no_member_after_it(tmp_path: Path) -> None:
    """After a restart, tokens must not repeat: a client still holding an old one would fetch
    and ack another member's messages (another group's, even) instead of joining again."""
    data = tmp_path / "data"
    tokens = []
    for life in range(2):
        async with running(ServeOptions(data=data, port=0, http_port=0)) as parts:
            client = await nats.connect(parts.nats.url)
            try:
                if life == 0:
                    name, _ = await make_stream(client)
                for kind in ("ordered", "shared"):
                    body = {"stream": name, "spec": {"group": f"g-{kind}", "kind": kind}}
                    tokens.append((await call(client, "GROUP.JOIN", body))["member"])
                with pytest.raises(MemberNotFoundError):
                    await call(client, "GROUP.FETCH", {"member": tokens[0] if life else "none", "batch": 1})
            finally:
                await client.close()
    assert len(set(tokens)) == 4
