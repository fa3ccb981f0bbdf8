"""JetStream differential, third slice: stream update, purge, deliver policies, redelivery
(ack wait, nak, nak with delay, term, in progress, max_deliver), max_ack_pending, pull status
replies, expectations, the duplicate window, stream state and key-value buckets, each run with
nats-py against the real ``nats-server -js`` and against pigeon's server, comparing what a
client observes.

Where pigeon legitimately differs, the field is left out of the comparison where it is read,
with the reason next to it. The end of the file checks what only pigeon has: updates that
survive a restart, retention applied by an update, and ``pigeon serve --durability``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from pigeon.engine import Engine, StartAt
from pigeon.engine import StreamConfig as EngineStreamConfig
from pigeon.errors import InvalidConfigError
from pigeon.server.jetstream import JetStream
from pigeon.server.nats import NatsServer, ServerOptions
from pigeon.testing.services import unique_name
from serve_process import Served
from test_server_jetstream import Pigeon, T, client, failure, run_reference

Scenario = Callable[[str, str], Awaitable[dict[str, Any]]]

# Config fields compared after an update. Left out: "metadata" (nats-server adds its own
# "_nats.*" API-level keys), "allow_direct" (pigeon answers DIRECT.GET on every stream and
# says so), "compression" and "allow_msg_ttl" (pigeon has neither), "created" (a clock).
CONFIG_FIELDS = (
    "name",
    "description",
    "subjects",
    "retention",
    "max_consumers",
    "max_msgs",
    "max_bytes",
    "max_age",
    "max_msgs_per_subject",
    "max_msg_size",
    "discard",
    "storage",
    "num_replicas",
    "duplicate_window",
    "sealed",
    "deny_delete",
    "deny_purge",
    "allow_rollup_hdrs",
)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_reference(tmp_path_factory.mktemp("js")) as url:
        yield url


@pytest.fixture
async def pigeon(tmp_path: Path) -> AsyncIterator[Pigeon]:
    instance = Pigeon(tmp_path / "data")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
def url(pigeon: Pigeon) -> str:
    assert pigeon.server is not None
    return pigeon.server.url


async def both(reference: str, url: str, scenario: Scenario) -> dict[str, Any]:
    """Run ``scenario(url, stream)`` on nats-server, then on pigeon; assert they agree."""
    stream = unique_name("d")
    expected = await scenario(reference, stream)
    got = await scenario(url, stream)
    assert got == expected
    return expected


def config_of(answer: dict[str, Any]) -> dict[str, Any]:
    return {field: answer["config"].get(field) for field in CONFIG_FIELDS}


async def request(nc: nats.NATS, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer: dict[str, Any] = json.loads((await nc.request(subject, data, timeout=T)).data)
    return answer


async def outcome(call: Awaitable[Any]) -> Any:
    """An API error as (code, err_code, description), or the name of another exception."""
    try:
        await call
    except nats.js.errors.APIError as error:
        if not hasattr(error, "code"):  # nats-py's key-value errors carry only their type
            return type(error).__name__
        return (error.code, error.err_code, error.description)
    except nats.errors.Error as error:
        return type(error).__name__
    return "ok"


async def fetched(sub: Any, batch: int, timeout: float) -> list[Any]:
    try:
        msgs: list[Any] = await sub.fetch(batch, timeout=timeout)
    except TimeoutError:  # nats-py's, or asyncio's when the 408 comes just after the timeout
        return []
    return msgs


async def state_of(nc: nats.NATS, stream: str) -> tuple[Any, ...]:
    """The state fields that must match (nats-py's StreamState has no num_subjects).

    bytes is left out: each server counts its own storage overhead.
    """
    state = (await request(nc, f"$JS.API.STREAM.INFO.{stream}", b""))["state"]
    fields = ("messages", "first_seq", "last_seq", "num_subjects", "consumer_count")
    return tuple(state.get(field) for field in fields)


# -- stream update --------------------------------------------------------------------------------


async def updates(server_url: str, stream: str) -> dict[str, Any]:
    """The updates nats-py's update_stream sends, accepted and refused.

    Message counts after a lowered limit are not compared: nats-server removes single
    messages, pigeon's engine whole segments (it never splits one), so it keeps more.
    """
    out: dict[str, Any] = {}
    other = f"{stream}-o"
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.a"])
        await js.add_stream(name=other, subjects=[f"{other}.>"])
        for _ in range(3):
            await js.publish(f"{stream}.a", b"x")

        async def update(label: str, **changes: Any) -> None:
            config = (await js.stream_info(stream)).config
            for field, value in changes.items():
                setattr(config, field, value)
            answer = await request(nc, f"$JS.API.STREAM.UPDATE.{stream}", config.as_dict())
            out[label] = answer["error"] if "error" in answer else config_of(answer)

        await update("add a subject", subjects=[f"{stream}.a", f"{stream}.b"])
        out["publish to the added subject"] = (await js.publish(f"{stream}.b", b"b")).seq
        await update("remove a subject", subjects=[f"{stream}.b"])
        out["publish to the removed subject"] = await outcome(js.publish(f"{stream}.a", b"a"))
        await update("overlap another stream", subjects=[f"{stream}.b", f"{other}.x"])
        await update("overlap itself", subjects=[f"{stream}.>", f"{stream}.b"])
        await update("invalid subject", subjects=[f"{stream}..b"])
        await update("capture everything", subjects=[">"])
        await update("capture the API", subjects=["$JS.API.>"])
        await update("limits", max_msgs=100, max_bytes=1 << 20, max_msgs_per_subject=-1)
        await update("max age and window", max_age=3600.0, duplicate_window=60.0)
        await update("window above max age", max_age=30.0)
        await update("max age too short", max_age=0.05, duplicate_window=0.05)
        await update("negative window", duplicate_window=-1e-9)
        await update("description", description="orders, kept a while")
        await update("max_msg_size", max_msg_size=64)
        # nats-server counts the header block and the payload.
        out["size 64"] = (await js.publish(f"{stream}.b", b"x" * 64)).seq
        out["size 65"] = await outcome(js.publish(f"{stream}.b", b"x" * 65))
        block = len(b"NATS/1.0\r\nK: v\r\n\r\n")
        out["headers at size"] = (
            await js.publish(f"{stream}.b", b"x" * (64 - block), headers={"K": "v"})
        ).seq
        out["headers over size"] = await outcome(
            js.publish(f"{stream}.b", b"x" * (65 - block), headers={"K": "v"})
        )
        await update("max_msg_size lifted", max_msg_size=-1)
        out["size 65 after"] = (await js.publish(f"{stream}.b", b"x" * 65)).seq
        await update("discard new and room for none", discard="new", max_msgs=1)
        out["publish when full"] = await outcome(js.publish(f"{stream}.b", b"full"))
        await update("room again", max_msgs=-1)
        await update("storage", storage="memory")
        await update("work queue", retention="workqueue")
        await update("replicas", num_replicas=3)
        await update("negative replicas", num_replicas=-1)
        out["name mismatch"] = (
            await request(nc, f"$JS.API.STREAM.UPDATE.{stream}", {"name": other, "subjects": ["q"]})
        )["error"]
        out["no name"] = (await request(nc, f"$JS.API.STREAM.UPDATE.{stream}", {"subjects": ["q"]}))["error"]
        bad_type = await request(nc, f"$JS.API.STREAM.UPDATE.{stream}", {"name": stream, "max_msgs": "5"})
        out["wrong type"] = bad_type["error"]["err_code"]  # the Go decoder's text is its own
        missing = await request(nc, f"$JS.API.STREAM.UPDATE.{stream}x", {"name": f"{stream}x"})
        out["missing stream"] = missing["error"]
        out["final"] = config_of(await request(nc, f"$JS.API.STREAM.INFO.{stream}", b""))
        await js.delete_stream(stream)
        await js.delete_stream(other)
    return out


async def test_stream_updates_match_nats_server(reference: str, url: str) -> None:
    out = await both(reference, url, updates)
    # The scenario reached what it meant to: changes taken, refusals with their codes.
    assert out["add a subject"]["subjects"][1].endswith(".b") and out["publish to the added subject"] == 4
    assert out["publish to the removed subject"] == "NoStreamResponseError"
    assert out["overlap another stream"]["err_code"] == 10065
    assert out["max_msg_size"]["max_msg_size"] == 64
    assert out["size 65"][1] == 10054 and out["headers over size"][1] == 10054
    assert out["description"]["description"] == "orders, kept a while"
    assert [out[k]["err_code"] for k in ("storage", "work queue", "replicas", "no name")] == [
        10052,
        10052,
        10074,
        10052,
    ]
    assert out["name mismatch"]["err_code"] == 10056 and out["missing stream"]["code"] == 404
    assert out["wrong type"] == 10025


async def test_update_to_interest_retention_is_refused_as_unsupported(url: str) -> None:
    # nats-server takes limits -> interest; pigeon has no interest retention at all, so it
    # answers as it does to a create asking for it.
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="keep", subjects=["keep.>"])
        refused = await failure(
            js.update_stream(StreamConfig(name="keep", subjects=["keep.>"], retention="interest"))
        )
        assert refused[:2] == (400, 10003) and "not supported" in refused[2]
        assert (await js.stream_info("keep")).config.retention == "limits"


# -- purge -----------------------------------------------------------------------------------------


async def purge_then_publish(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.*"])
        for leaf in "abca":
            await js.publish(f"{stream}.{leaf}", leaf.encode())
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit")
        sub = await js.pull_subscribe_bind("c", stream=stream)
        first = await sub.fetch(1, timeout=T)
        await first[0].ack_sync(timeout=T)
        out["before"] = await state_of(nc, stream)
        out["purged"] = await js.purge_stream(stream)
        out["after purge"] = await state_of(nc, stream)
        # The time of the last message outlives the purge, in both.
        state = (await request(nc, f"$JS.API.STREAM.INFO.{stream}", b""))["state"]
        out["last_ts kept"] = state["last_ts"] != "0001-01-01T00:00:00Z"
        out["consumer after purge"] = consumer_state(await js.consumer_info(stream, "c"))
        out["publish after purge"] = (await js.publish(f"{stream}.b", b"next")).seq
        out["after publish"] = await state_of(nc, stream)
        msgs = await sub.fetch(5, timeout=1.0)
        out["consumer reads"] = [(m.data, m.metadata.sequence.stream) for m in msgs]
        await js.delete_stream(stream)
    return out


async def test_purge_keeps_sequences_going(reference: str, url: str) -> None:
    out = await both(reference, url, purge_then_publish)
    assert out["before"] == (4, 1, 4, 3, 1)
    assert out["after purge"] == (0, 5, 4, None, 1) and out["publish after purge"] == 5
    # The consumer counts what the purge removed as delivered and acknowledged.
    assert out["consumer after purge"] == (0, 0, 0, 4, 1, 4, 1)
    assert out["consumer reads"] == [(b"next", 5)]


# -- deliver policies ------------------------------------------------------------------------------


async def by_start_time(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for i in range(4):
            await js.publish(stream, b"%d" % i)
            await asyncio.sleep(0.02)
        third = await js.get_msg(stream, seq=3)
        assert third.time is not None
        for label, start in {
            "at the third": third.time,
            "just after the third": third.time + timedelta(microseconds=1),
            "before everything": third.time - timedelta(days=1),
        }.items():
            name = label.replace(" ", "_")
            info = await js.add_consumer(
                stream,
                durable_name=name,
                ack_policy="explicit",
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=start.isoformat().replace("+00:00", "Z"),
            )
            sub = await js.pull_subscribe_bind(name, stream=stream)
            msgs = await fetched(sub, 10, 0.5)
            out[label] = (info.num_pending, [m.data for m in msgs])
        await js.delete_stream(stream)
    return out


async def test_deliver_by_start_time(reference: str, url: str) -> None:
    out = await both(reference, url, by_start_time)
    assert out["at the third"] == (2, [b"2", b"3"]) and out["just after the third"] == (1, [b"3"])


async def last_per_subject(server_url: str, stream: str, filtered: bool) -> Any:
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.*"])
        for leaf, data in [("a", b"a1"), ("b", b"b1"), ("a", b"a2")]:
            await js.publish(f"{stream}.{leaf}", data)
        config = ConsumerConfig(
            durable_name="last",
            ack_policy="explicit",
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            filter_subject=f"{stream}.*" if filtered else None,
        )
        try:
            await js.add_consumer(stream, config)
            sub = await js.pull_subscribe_bind("last", stream=stream)
            return [m.data for m in await fetched(sub, 10, 0.5)]
        except nats.js.errors.APIError as error:
            return (error.code, error.err_code, error.description)
        finally:
            await js.delete_stream(stream)


async def test_last_per_subject_is_refused_by_pigeon(reference: str, url: str) -> None:
    # nats-server delivers the last message of each subject; pigeon's groups start at one
    # offset and cannot skip the earlier messages of some subjects, so it says so.
    stream = unique_name("lps")
    assert await last_per_subject(reference, stream, filtered=True) == [b"b1", b"a2"]
    refused = await last_per_subject(url, stream, filtered=True)
    assert refused[:2] == (400, 10003) and "last_per_subject" in refused[2]
    # Without a filter both refuse it, the same way.
    unfiltered = await last_per_subject(reference, stream, filtered=False)
    assert unfiltered[:2] == (400, 10094)
    assert await last_per_subject(url, stream, filtered=False) == unfiltered


# -- redelivery: ack wait, nak, nak with delay, term, in progress, max_deliver ---------------------


def delivered(msgs: list[Any]) -> list[tuple[Any, ...]]:
    return [(m.data, m.metadata.sequence.stream, m.metadata.num_delivered) for m in msgs]


def consumer_state(info: Any) -> tuple[Any, ...]:
    return (
        info.num_pending,
        info.num_ack_pending,
        info.num_redelivered,
        info.delivered.stream_seq,
        info.delivered.consumer_seq,
        info.ack_floor.stream_seq,
        info.ack_floor.consumer_seq,
    )


async def max_deliver_by_nak(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        await js.publish(stream, b"poison")
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit", max_deliver=3)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        # One message at a time: a nak is applied when the server gets to it, so a second
        # message could overtake the redelivery on one server and not the other.
        seen = []
        for _ in range(3):
            msgs = await sub.fetch(1, timeout=T)
            seen += delivered(msgs)
            await msgs[0].nak()
        out["seen"] = seen
        out["given up"] = delivered(await fetched(sub, 5, 0.7))
        await js.publish(stream, b"fine")
        fine = await sub.fetch(1, timeout=T)
        for msg in fine:
            await msg.ack_sync(timeout=T)
        out["after"] = delivered(fine)
        # Compared once both have settled: nats-server drops an exhausted message from its
        # pending list only at the next pull, pigeon at once.
        end = consumer_state(await js.consumer_info(stream, "c"))
        # num_redelivered left out: nats-server goes on counting a message it gave up on (its
        # redelivery count stays), pigeon counts the redelivered messages still in flight.
        out["end"] = end[:2] + end[3:]
        await js.delete_stream(stream)
    return out


async def test_max_deliver_counts_naks(reference: str, url: str) -> None:
    out = await both(reference, url, max_deliver_by_nak)
    assert out["seen"] == [(b"poison", 1, 1), (b"poison", 1, 2), (b"poison", 1, 3)]
    assert out["given up"] == [] and out["after"] == [(b"fine", 2, 1)]


async def ack_wait_expiry(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        await js.publish(stream, b"slow")
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit", ack_wait=0.5)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        out["first"] = delivered(await sub.fetch(1, timeout=T))
        started = time.monotonic()
        out["too soon"] = delivered(await fetched(sub, 1, 0.2))
        again = await sub.fetch(1, timeout=3)
        out["waited about ack_wait"] = 0.3 < time.monotonic() - started < 1.5
        out["again"] = delivered(again)
        out["while held"] = consumer_state(await js.consumer_info(stream, "c"))
        await again[0].ack_sync(timeout=T)
        out["acked"] = consumer_state(await js.consumer_info(stream, "c"))
        await js.delete_stream(stream)
    return out


async def test_ack_wait_expiry_redelivers(reference: str, url: str) -> None:
    out = await both(reference, url, ack_wait_expiry)
    assert out["again"] == [(b"slow", 1, 2)] and out["too soon"] == []
    assert out["acked"] == (0, 0, 0, 1, 2, 1, 2)


async def nak_with_delay(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        await js.publish(stream, b"later")
        await js.publish(stream, b"now")
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit")
        sub = await js.pull_subscribe_bind("c", stream=stream)
        first = await sub.fetch(1, timeout=T)
        await first[0].nak(delay=0.8)
        nacked = time.monotonic()
        # The delayed one steps aside: the next message comes first.
        following = await sub.fetch(1, timeout=T)
        out["meanwhile"] = delivered(following)
        await following[0].ack_sync(timeout=T)
        out["not yet"] = delivered(await fetched(sub, 1, 0.3))
        back = await sub.fetch(1, timeout=3)
        out["after the delay"] = (delivered(back), time.monotonic() - nacked >= 0.7)
        await back[0].ack_sync(timeout=T)
        out["done"] = consumer_state(await js.consumer_info(stream, "c"))
        await js.delete_stream(stream)
    return out


async def test_nak_with_delay(reference: str, url: str) -> None:
    out = await both(reference, url, nak_with_delay)
    assert out["meanwhile"] == [(b"now", 2, 1)] and out["not yet"] == []
    assert out["after the delay"] == ([(b"later", 1, 2)], True)


async def term(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for data in (b"bad", b"good"):
            await js.publish(stream, data)
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit", ack_wait=0.4)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        bad = await sub.fetch(1, timeout=T)
        await bad[0].term()
        good = await sub.fetch(1, timeout=T)
        out["next"] = delivered(good)
        await good[0].ack_sync(timeout=T)
        await asyncio.sleep(0.6)  # past ack_wait: a termed message does not come back
        out["nothing more"] = delivered(await fetched(sub, 5, 0.5))
        out["state"] = consumer_state(await js.consumer_info(stream, "c"))
        await js.delete_stream(stream)
    return out


async def test_term_stops_redelivery(reference: str, url: str) -> None:
    out = await both(reference, url, term)
    assert out["next"] == [(b"good", 2, 1)] and out["nothing more"] == []
    assert out["state"] == (0, 0, 0, 2, 2, 2, 2)


async def in_progress(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        await js.publish(stream, b"long job")
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit", ack_wait=1.0)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        msg = (await sub.fetch(1, timeout=T))[0]
        redelivered = []
        for _ in range(7):  # over 2 s of work, twice ack_wait
            await asyncio.sleep(0.3)
            await msg.in_progress()
            redelivered += delivered(await fetched(sub, 1, 0.01))
        out["redelivered while in progress"] = redelivered
        out["held"] = consumer_state(await js.consumer_info(stream, "c"))
        await msg.ack_sync(timeout=T)
        out["acked"] = consumer_state(await js.consumer_info(stream, "c"))
        await js.delete_stream(stream)
    return out


async def test_in_progress_extends_the_ack_wait(reference: str, url: str) -> None:
    out = await both(reference, url, in_progress)
    assert out["redelivered while in progress"] == [] and out["acked"] == (0, 0, 0, 1, 1, 1, 1)


async def max_ack_pending(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        for i in range(5):
            await js.publish(stream, b"%d" % i)
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit", max_ack_pending=2)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        held = await fetched(sub, 5, 0.5)
        out["first fetch"] = delivered(held)
        out["held"] = consumer_state(await js.consumer_info(stream, "c"))
        await held[0].ack_sync(timeout=T)
        more = await fetched(sub, 5, 0.5)
        out["after one ack"] = delivered(more)
        await js.delete_stream(stream)
    return out


async def test_max_ack_pending_limits_a_fetch(reference: str, url: str) -> None:
    out = await both(reference, url, max_ack_pending)
    assert [data for data, _, _ in out["first fetch"]] == [b"0", b"1"]
    assert out["after one ack"] == [(b"2", 3, 1)]


# -- pull request status replies -------------------------------------------------------------------


async def pull_statuses(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[stream])
        await js.add_consumer(stream, durable_name="c", ack_policy="explicit")
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.c"
        for label, body in {
            "no_wait on empty": {"batch": 1, "no_wait": True},
            "expires on empty": {"batch": 3, "expires": 300_000_000},
        }.items():
            started = time.monotonic()
            await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
            status = await replies.next_msg(T)
            headers = status.headers or {}
            out[label] = (
                status.data,
                headers.get("Status"),
                headers.get("Description"),
                headers.get("Nats-Pending-Messages"),
                headers.get("Nats-Pending-Bytes"),
                time.monotonic() - started > 0.25,
            )
        # no_wait with expires (what nats-py's fetch sends): the messages there, then 404 at
        # once; on an empty stream it waits for the first message, then ends the same way.
        for label, count in (("no_wait expires, 2 there", 2), ("no_wait expires, 1 comes later", 0)):
            for i in range(count):
                await js.publish(stream, b"%d" % i)
            started = time.monotonic()
            body = {"batch": 10, "expires": 2_000_000_000, "no_wait": True}
            await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
            if not count:
                await asyncio.sleep(0.3)
                await js.publish(stream, b"late")
            got: list[Any] = []
            while True:
                reply = await replies.next_msg(T)
                status = (reply.headers or {}).get("Status")
                got.append(status or reply.data)
                if status:
                    break
                await reply.ack()
            out[label] = (got, time.monotonic() - started < 1.5)
        sub = await js.pull_subscribe_bind("c", stream=stream)
        try:
            await sub.fetch(1, timeout=0.3)
            out["nats-py fetch"] = "got something"
        except TimeoutError:  # nats-py raises asyncio's when the 408 comes after its timeout
            out["nats-py fetch"] = "timeout"
        await js.delete_stream(stream)
    return out


async def test_pull_status_replies(reference: str, url: str) -> None:
    out = await both(reference, url, pull_statuses)
    assert out["no_wait on empty"][1:3] == ("404", "No Messages")
    assert out["expires on empty"][1:4] == ("408", "Request Timeout", "3")
    assert out["no_wait expires, 2 there"] == ([b"0", b"1", "404"], True)
    assert out["no_wait expires, 1 comes later"] == ([b"late", "404"], True)


# -- expectations and the duplicate window --------------------------------------------------------


async def expectations(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.*"])
        await js.publish(f"{stream}.a", b"1")
        await js.publish(f"{stream}.b", b"2")
        for label, leaf, headers in [
            ("last seq wrong", "a", {"Nats-Expected-Last-Sequence": "1"}),
            ("last seq right", "a", {"Nats-Expected-Last-Sequence": "2"}),
            ("last seq zero on a stream with messages", "a", {"Nats-Expected-Last-Sequence": "0"}),
            ("subject seq wrong", "b", {"Nats-Expected-Last-Subject-Sequence": "1"}),
            ("subject seq right", "b", {"Nats-Expected-Last-Subject-Sequence": "2"}),
            ("subject seq zero on a new subject", "c", {"Nats-Expected-Last-Subject-Sequence": "0"}),
            ("stream wrong", "a", {"Nats-Expected-Stream": "elsewhere"}),
        ]:
            out[label] = await outcome(js.publish(f"{stream}.{leaf}", label.encode(), headers=headers))
        out["state"] = await state_of(nc, stream)
        await js.delete_stream(stream)
    return out


async def test_expected_sequences(reference: str, url: str) -> None:
    out = await both(reference, url, expectations)
    assert out["last seq wrong"] == (400, 10071, "wrong last sequence: 2")
    assert out["last seq right"] == "ok" and out["subject seq right"] == "ok"
    assert out["subject seq wrong"][:2] == (400, 10071)
    assert out["state"] == (5, 1, 5, 3, 0)


async def duplicate_window(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        created = await js.add_stream(name=stream, subjects=[stream], duplicate_window=0.5)
        out["window"] = created.config.duplicate_window
        acks = []
        for data in (b"one", b"one again"):
            ack = await js.publish(stream, data, headers={"Nats-Msg-Id": "m1"})
            acks.append((ack.seq, bool(ack.duplicate)))
        await asyncio.sleep(1.2)  # past the window: the id is forgotten
        ack = await js.publish(stream, b"one later", headers={"Nats-Msg-Id": "m1"})
        acks.append((ack.seq, bool(ack.duplicate)))
        out["acks"] = acks
        out["too short"] = await outcome(
            js.add_stream(name=f"{stream}s", subjects=[f"{stream}s"], duplicate_window=0.05)
        )
        aged = await js.add_stream(name=f"{stream}a", subjects=[f"{stream}a"], max_age=30)
        out["window follows a short max age"] = aged.config.duplicate_window
        await js.delete_stream(f"{stream}a")
        await js.delete_stream(stream)
    return out


async def test_duplicate_window(reference: str, url: str) -> None:
    out = await both(reference, url, duplicate_window)
    assert out["acks"] == [(1, False), (1, True), (2, False)]
    assert out["window follows a short max age"] == 30.0 and out["too short"][1] == 10052


# -- stream state ----------------------------------------------------------------------------------


async def stream_state(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        out["empty"] = await state_of(nc, stream)
        for subject in ("a", "b.c", "a", "d", "b.c"):
            await js.publish(f"{stream}.{subject}", b"x")
        await js.add_consumer(stream, durable_name="one", ack_policy="explicit")
        await js.add_consumer(stream, durable_name="two", ack_policy="explicit")
        out["filled"] = await state_of(nc, stream)
        await js.delete_consumer(stream, "two")
        out["one consumer"] = await state_of(nc, stream)
        await js.delete_stream(stream)
    return out


async def test_stream_state(reference: str, url: str) -> None:
    out = await both(reference, url, stream_state)
    assert out["empty"] == (0, 0, 0, None, 0) and out["filled"] == (5, 1, 5, 3, 2)


# -- key-value buckets ----------------------------------------------------------------------------


async def key_value(server_url: str, stream: str) -> dict[str, Any]:
    """What nats-py's key-value API needs of a stream (it sets flags pigeon takes without acting
    on them: rollups, deny_delete, message TTLs) for put, get, create, update and delete."""
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        kv = await js.create_key_value(bucket=stream.replace("-", "_"), history=2)
        out["put"] = [await kv.put("k", b"v1"), await kv.put("k", b"v2")]
        entry = await kv.get("k")
        out["get"] = (entry.value, entry.revision)
        out["create existing"] = await outcome(kv.create("k", b"again"))
        out["update stale"] = await outcome(kv.update("k", b"v3", last=1))
        out["update"] = await kv.update("k", b"v3", last=2)
        out["create new"] = await kv.create("j", b"j1")
        await kv.delete("k")
        out["get deleted"] = await outcome(kv.get("k"))
        status = await kv.status()
        # status.values (the stream's message count) left out: history beyond the limit is
        # hidden from reads at once, but counted until its whole segment goes.
        out["status"] = (status.bucket, status.history)
        await js.delete_key_value(stream.replace("-", "_"))
    return out


async def test_key_value_buckets(reference: str, url: str) -> None:
    out = await both(reference, url, key_value)
    assert out["put"] == [1, 2] and out["get"] == (b"v2", 2) and out["update"] == 3
    assert out["get deleted"] == "KeyNotFoundError" and out["create existing"] == "KeyWrongLastSequenceError"


# -- pigeon only -----------------------------------------------------------------------------------


async def test_updated_settings_survive_a_restart(pigeon: Pigeon, url: str) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="kept", subjects=["kept.a"])
        await js.update_stream(
            StreamConfig(
                name="kept", subjects=["kept.b"], description="was kept.a", max_msg_size=10, max_age=60
            )
        )
    await pigeon.stop()
    async with client(await pigeon.start()) as nc:
        js = nc.jetstream(timeout=T)
        config = (await js.stream_info("kept")).config
        assert (config.subjects, config.description, config.max_msg_size) == (["kept.b"], "was kept.a", 10)
        assert (config.max_age, config.duplicate_window) == (60.0, 60.0)
        assert (await js.publish("kept.b", b"x" * 10)).seq == 1
        assert (await outcome(js.publish("kept.b", b"x" * 11)))[1] == 10054
        assert await outcome(js.publish("kept.a", b"old subject")) == "NoStreamResponseError"
        # A create with other settings than the stored ones is told the name is in use.
        refused = await failure(js.add_stream(name="kept", subjects=["kept.b"], description="other"))
        assert refused[:2] == (400, 10058)


async def test_an_update_applies_new_limits_to_stored_segments(tmp_path: Path) -> None:
    """Lowering max_msgs through JetStream removes the sealed segments it allows at once."""
    engine = await Engine.open(tmp_path / "data")
    server = NatsServer(ServerOptions(port=0))
    await server.start()
    try:
        # Small segments (only the engine API sets them) so that retention has whole ones to drop.
        await engine.create_stream(EngineStreamConfig("seg", ("seg.>",), segment_bytes=1024))
        js_server = await JetStream.attach(server, engine)
        try:
            async with client(server.url) as nc:
                js = nc.jetstream(timeout=T)
                for i in range(200):
                    await js.publish("seg.x", b"%03d" % i + b"." * 40)
                before = engine.stream_info("seg").partitions[0]
                assert before.segments > 5 and before.messages == 200
                updated = await js.update_stream(StreamConfig(name="seg", subjects=["seg.>"], max_msgs=50))
                after = engine.stream_info("seg").partitions[0]
                assert 50 <= after.messages < 100 and after.first_offset > 0
                assert (updated.state.messages, updated.state.first_seq) == (
                    after.messages,
                    after.first_offset + 1,
                )
                # The newest 50 are all there.
                tail = engine.fetch("seg", 0, 150, 50)
                assert [m.payload[:3] for m in tail] == [b"%03d" % i for i in range(150, 200)]
        finally:
            await js_server.close()
    finally:
        await server.stop()
        await engine.close()
    engine = await Engine.open(tmp_path / "data")
    try:
        assert engine.stream_info("seg").config.max_msgs == 50
        assert engine.resolve("seg", 0, StartAt.earliest()) == after.first_offset
    finally:
        await engine.close()


async def test_attach_refuses_an_unknown_durability(tmp_path: Path) -> None:
    async with await Engine.open(tmp_path / "data") as engine, NatsServer(ServerOptions(port=0)) as server:
        with pytest.raises(InvalidConfigError, match="durability"):
            await JetStream.attach(server, engine, durability="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("durability", ["always", "never"])
async def test_serve_durability_option_reaches_streams_created_by_clients(
    tmp_path: Path, durability: str
) -> None:
    data = tmp_path / "data"
    served = Served(data, 0, "--durability", durability).wait_listening()
    try:
        async with client(served.nats_url) as nc:
            js = nc.jetstream(timeout=T)
            await js.add_stream(name="made", subjects=["made.>"])
            assert (await js.publish("made.x", b"1")).seq == 1
    finally:
        assert served.stop() == 0
    async with await Engine.open(data) as engine:
        assert engine.stream_info("made").config.durability == durability
    # Served again with the default, the stream keeps its durability and a client's
    # create with the same settings is still the same stream.
    served = Served(data, 0).wait_listening()
    try:
        async with client(served.nats_url) as nc:
            js = nc.jetstream(timeout=T)
            assert not (await js.add_stream(name="made", subjects=["made.>"])).did_create
            await js.add_stream(name="fresh", subjects=["fresh.>"])
    finally:
        assert served.stop() == 0
    async with await Engine.open(data) as engine:
        assert engine.stream_info("made").config.durability == durability
        assert engine.stream_info("fresh").config.durability == "interval"
