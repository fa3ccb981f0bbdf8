"""JetStream on pigeon's NATS server, second slice: wildcard API subjects, filtered and
ephemeral consumers, consumer listing, message get (stored and direct), stream update and
backoff. Scenarios run against the real nats-server too where the comparison is cheap.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig

from test_server_jetstream import Pigeon, T, client, failure, run_reference

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


async def both(reference: str, url: str, scenario: Any) -> dict[str, Any]:
    """Run ``scenario(url, stream)`` on nats-server and on pigeon; assert they agree."""
    stream = f"m{time.time_ns() % 10**9}"
    expected = await scenario(reference, stream)
    got = await scenario(url, stream)
    assert got == expected
    result: dict[str, Any] = expected
    return result


async def data_of(sub: Any, batch: int, timeout: float = 0.5) -> list[bytes]:
    try:
        msgs = await sub.fetch(batch, timeout=timeout)
    except TimeoutError:  # nats-py raises asyncio's when the 408 comes after its timeout
        return []
    for msg in msgs:
        await msg.ack_sync(timeout=T)
    return [m.data for m in msgs]


# -- core routing of subjects with wildcard tokens ------------------------------------------------


async def pending(js: Any, stream: str, durable: str) -> int:
    return int((await js.consumer_info(stream, durable)).num_pending)


async def settled(read: Any, want: int, timeout: float = 3.0) -> int:
    """What ``read()`` returns once it returns ``want`` (or, after ``timeout``, its last answer)."""
    deadline = time.monotonic() + timeout
    value = await read()
    while value != want and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        value = await read()
    return value


async def routing(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        got: dict[str, list[str]] = {}
        for pattern in (f"{stream}.>", f"{stream}.*", f"{stream}.a", f"{stream}.*.b"):
            got[pattern] = []

            async def collect(msg: Any, pattern: str = pattern) -> None:
                got[pattern].append(msg.subject)

            await nc.subscribe(pattern, cb=collect)
        for subject in (f"{stream}.*", f"{stream}.>", f"{stream}.*.b", f"{stream}.a", f"{stream}..a"):
            await nc.publish(subject, b"x")
        await nc.flush(T)
        await asyncio.sleep(0.1)
        out["got"] = {pattern: sorted(subjects) for pattern, subjects in got.items()}
    return out


async def test_publish_subjects_with_wildcards_route_literally(reference: str, url: str) -> None:
    out = await both(reference, url, routing)
    got = out["got"]
    stream = next(iter(got))[:-2]
    # A published '*' is a token: '<s>.*' subscribers and '<s>.>' get it, a literal '<s>.a' does not.
    assert got[f"{stream}.*"] == sorted([f"{stream}.*", f"{stream}.>", f"{stream}.a"])
    assert f"{stream}.*.b" in got[f"{stream}.*.b"] and f"{stream}..a" not in got[f"{stream}.>"]


# -- filtered consumers ---------------------------------------------------------------------------


async def filtered(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i, leaf in enumerate(["a", "b", "x.y", "a", "c", "b"]):
            await js.publish(f"{stream}.{leaf}", b"%d" % i)
        sub = await js.pull_subscribe(f"{stream}.*", durable="star")
        out["star info"] = (await js.consumer_info(stream, "star")).num_pending
        msgs = await sub.fetch(2, timeout=T)
        out["star first"] = [(m.subject, m.data, m.metadata.num_pending) for m in msgs]
        for m in msgs:
            await m.ack_sync(timeout=T)
        out["star rest"] = await data_of(sub, 10)
        await js.add_consumer(stream, durable_name="ab", filter_subjects=[f"{stream}.a", f"{stream}.x.>"])
        info = await js.consumer_info(stream, "ab")
        out["ab config"] = (info.config.filter_subject, info.config.filter_subjects, info.num_pending)
        ab = await js.pull_subscribe_bind("ab", stream=stream)
        out["ab"] = await data_of(ab, 10)
        await js.publish(f"{stream}.b", b"late b")
        await js.publish(f"{stream}.a", b"late a")
        # nats-server counts a new message for its consumers a moment after the PubAck
        out["ab pending"] = await settled(lambda: pending(js, stream, "ab"), 1)
        out["ab late"] = await data_of(ab, 10, timeout=1.0)
        await js.add_consumer(stream, durable_name="c", filter_subject=f"{stream}.c")
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.c", b'{"batch": 2, "no_wait": true}', reply=inbox
        )
        first, second = await replies.next_msg(T), await replies.next_msg(T)
        out["c no_wait"] = [(m.data, (m.headers or {}).get("Status")) for m in (first, second)]
        out["outside"] = (
            await js.add_consumer(stream, durable_name="o", filter_subject="elsewhere")
        ).num_pending
        for name, config in {
            "both": {"filter_subject": f"{stream}.a", "filter_subjects": [f"{stream}.b"]},
            "overlap": {"filter_subjects": [f"{stream}.*", f"{stream}.a"]},
            "invalid": {"filter_subject": f"{stream}..a"},
        }.items():
            out[name] = await failure(js.add_consumer(stream, ConsumerConfig(durable_name=name, **config)))
        request = {"stream_name": stream, "config": {"name": "mm", "filter_subject": f"{stream}.a"}}
        reply = await nc.request(
            f"$JS.API.CONSUMER.CREATE.{stream}.mm.{stream}.b", json.dumps(request).encode(), timeout=T
        )
        out["subject mismatch"] = json.loads(reply.data)["error"]["err_code"]
        await js.delete_stream(stream)
    return out


async def test_filtered_consumers_deliver_and_count_only_matches(reference: str, url: str) -> None:
    out = await both(reference, url, filtered)
    assert out["star info"] == 5
    assert [d for _, d, _ in out["star first"]] == [b"0", b"1"] and out["star first"][-1][2] == 3
    assert out["star rest"] == [b"3", b"4", b"5"]
    assert out["ab"] == [b"0", b"2", b"3"] and out["ab late"] == [b"late a"]
    assert out["ab pending"] == 1 and out["outside"] == 0
    assert [out[k][1] for k in ("both", "overlap", "invalid")] == [10136, 10138, 10052]
    assert out["subject mismatch"] == 10131
    assert out["c no_wait"] == [(b"4", None), (b"", "404")]  # the one match, found past the skipped messages


async def test_filters_survive_a_restart(pigeon: Pigeon) -> None:
    assert pigeon.server is not None
    async with client(pigeon.server.url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="fr", subjects=["fr.*"])
        await js.add_consumer("fr", durable_name="only_a", filter_subject="fr.a")
        for leaf in "abab":
            await js.publish(f"fr.{leaf}", leaf.encode())
    await pigeon.stop()
    url = await pigeon.start()
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        info = await js.consumer_info("fr", "only_a")
        assert (info.config.filter_subject, info.num_pending) == ("fr.a", 2)
        sub = await js.pull_subscribe_bind("only_a", stream="fr")
        assert await data_of(sub, 5) == [b"a", b"a"]


# -- ephemeral consumers --------------------------------------------------------------------------


async def test_ephemeral_consumers(url: str, pigeon: Pigeon) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="eph", subjects=["eph.*"])
        await js.publish("eph.a", b"1")
        await js.publish("eph.b", b"2")
        sub = await js.pull_subscribe("eph.b")  # no durable: nats-py names it, the server forgets it
        assert await data_of(sub, 5, timeout=T) == [b"2"]
        info = await sub.consumer_info()
        assert info.config.durable_name is None and info.config.inactive_threshold == 5.0
        created = await js.add_consumer("eph", ConsumerConfig(inactive_threshold=0.4))
        assert created.name and created.name != info.name and created.config.durable_name is None
        kept = await js.pull_subscribe_bind(created.name, stream="eph")
        for _ in range(4):  # pull requests keep it alive past its threshold
            await data_of(kept, 1, timeout=0.2)
        names = [c.name for c in await js.consumers_info("eph")]
        assert created.name in names and info.name in names
        deadline = time.monotonic() + 3
        while created.name in [c.name for c in await js.consumers_info("eph")]:
            assert time.monotonic() < deadline, "the idle ephemeral consumer was not deleted"
            await asyncio.sleep(0.1)
        gone = await failure(js.consumer_info("eph", created.name))
        assert gone[:2] == (404, 10014)
    # A restart forgets the remaining (nats-py made) ephemeral consumer.
    await pigeon.stop()
    async with client(await pigeon.start()) as nc:
        js = nc.jetstream(timeout=T)
        assert [c.name for c in await js.consumers_info("eph")] == []


async def test_ephemeral_create_with_a_durable_name_is_refused(reference: str, url: str) -> None:
    async def scenario(server_url: str, stream: str) -> dict[str, Any]:
        async with client(server_url) as nc:
            js = nc.jetstream(timeout=T)
            await js.add_stream(name=stream, subjects=[stream])
            body = {"stream_name": stream, "config": {"durable_name": "d", "ack_policy": "explicit"}}
            reply = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps(body).encode(), timeout=T
            )
            created = await js.add_consumer(stream, ConsumerConfig(ack_policy="explicit"))
            out = {
                "error": json.loads(reply.data)["error"],
                "ephemeral": (
                    created.config.durable_name,
                    created.config.inactive_threshold,
                    len(created.name),
                ),
            }
            await js.delete_stream(stream)
            return out

    out = await both(reference, url, scenario)
    assert out["error"]["err_code"] == 10020 and out["ephemeral"] == (None, 5.0, 8)


# -- consumer names and list, message get, stream update ------------------------------------------


async def reads(server_url: str, stream: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(server_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name=stream, subjects=[f"{stream}.*"], allow_direct=True)
        await js.publish(f"{stream}.a", b"one", headers={"X-Trace": "t1"})
        await js.publish(f"{stream}.b", b"two")
        await js.publish(f"{stream}.a", b"three")
        await js.publish(f"{stream}.c", b"")
        for name in ("zeta", "alpha"):
            await js.add_consumer(stream, durable_name=name, ack_policy="explicit")
        names = json.loads((await nc.request(f"$JS.API.CONSUMER.NAMES.{stream}", b"", timeout=T)).data)
        out["names"] = (names["total"], sorted(names["consumers"]))
        out["list"] = sorted((c.name, c.num_pending) for c in await js.consumers_info(stream))
        for direct in (False, True):
            by_seq = await js.get_msg(stream, seq=1, direct=direct)
            last = await js.get_last_msg(stream, f"{stream}.a", direct=direct)
            empty = await js.get_msg(stream, seq=4, direct=direct)
            out[f"get direct={direct}"] = [
                (m.subject, m.seq, m.data, {k: v for k, v in (m.headers or {}).items() if k == "X-Trace"})
                for m in (by_seq, last, empty)
            ]
            out[f"missing direct={direct}"] = await missing(js.get_msg(stream, seq=99, direct=direct))
            out[f"missing subject direct={direct}"] = await missing(
                js.get_last_msg(stream, f"{stream}.zz", direct=direct)
            )
        raw = await nc.request(f"$JS.API.DIRECT.GET.{stream}", b'{"seq": 1}', timeout=T)
        assert raw.headers is not None
        out["direct headers"] = sorted(k for k in raw.headers if k.startswith("Nats-") or k == "X-Trace")
        out["direct time"] = raw.headers["Nats-Time-Stamp"].endswith("Z")
        info = await js.stream_info(stream)
        same = await js.update_stream(info.config)
        out["update same"] = (same.config.subjects, same.state.messages)
        info.config.storage = "memory"  # type: ignore[assignment]
        out["update storage"] = await failure(js.update_stream(info.config))
        out["update missing"] = await failure(js.update_stream(name=f"{stream}x", subjects=[f"{stream}x"]))
        await js.delete_stream(stream)
    return out


async def missing(call: Any) -> str:
    try:
        await call
    except nats.js.errors.NotFoundError as error:
        return f"not found {getattr(error, 'err_code', None)}"
    return "found"


async def test_consumer_listing_message_get_and_update(reference: str, url: str) -> None:
    out = await both(reference, url, reads)
    assert out["names"] == (2, ["alpha", "zeta"])
    stream_a = out["get direct=False"][0][0]
    assert out["get direct=True"][0] == (stream_a, 1, b"one", {"X-Trace": "t1"})
    assert out["get direct=False"][1][1:3] == (3, b"three")
    assert out["missing direct=False"] == "not found 10037"
    assert out["direct headers"] == [
        "Nats-Sequence",
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Time-Stamp",
        "X-Trace",
    ]
    assert out["update storage"][:2] == (500, 10052) and out["update missing"][:2] == (404, 10059)


async def update_scenario(url: str) -> dict[str, Any]:
    """Stream updates a client makes, and what the server answers to each.

    Message counts are kept apart (``out["stored"]``): lowering a limit removes single messages
    on nats-server but whole segments on pigeon's engine, whose retention never splits one.
    """
    out: dict[str, Any] = {}
    stored: dict[str, int] = {}
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="up", subjects=["up.>"])
        await js.add_stream(name="other", subjects=["other.>"])
        for _ in range(10):
            await js.publish("up.a", b"x")

        async def update(label: str, **changes: Any) -> None:
            config = (await js.stream_info("up")).config
            for field, value in changes.items():
                setattr(config, field, value)
            reply = await nc.request(
                "$JS.API.STREAM.UPDATE.up", json.dumps(config.as_dict()).encode(), timeout=T
            )
            answer = json.loads(reply.data)
            if "error" in answer:
                out[label] = ("error", answer["error"]["code"], answer["error"]["err_code"])
            else:
                c = answer["config"]
                out[label] = (c["subjects"], c["max_msgs"], c["max_age"], c["discard"])
                stored[label] = answer["state"]["messages"]

        await update("more subjects", subjects=["up.>", "extra.>"])
        await update("overlapping subjects", subjects=["other.x"])
        await update("fewer messages", max_msgs=5)
        await update("discard new", discard="new")
        await update("max age", max_age=3600.0)
        await update("dedup window", duplicate_window=10.0)
        await update("storage", storage="memory")
        await update("replicas", num_replicas=3)
        await update("work queue", retention="workqueue")
        # The new subject is captured at once; the stream is full (discard new, 5 of 5).
        out["publish to new subject"] = await failure(js.publish("extra.b", b"y"))
        await update("room again", max_msgs=20)
        out["publish after"] = (await js.publish("extra.b", b"y")).seq
        stored["end"] = (await js.stream_info("up")).state.messages
        missing = await nc.request(
            "$JS.API.STREAM.UPDATE.nope", b'{"name": "nope", "subjects": ["n"]}', timeout=T
        )
        out["missing"] = json.loads(missing.data)["error"]["err_code"]
        mismatch = await nc.request(
            "$JS.API.STREAM.UPDATE.up", b'{"name": "else", "subjects": ["n"]}', timeout=T
        )
        out["mismatch"] = json.loads(mismatch.data)["error"]["err_code"]
        await js.delete_stream("up")
        await js.delete_stream("other")
    out["stored"] = stored
    return out


async def test_stream_updates_match_nats_server(reference: str, url: str) -> None:
    expected = await update_scenario(reference)
    assert expected["stored"]["fewer messages"] == 5 and expected["storage"][0] == "error"  # it bites
    got = await update_scenario(url)
    counts, expected_counts = got.pop("stored"), expected.pop("stored")
    assert got == expected
    # Whole segments only: nothing is removed from the one open segment, and nothing is lost.
    assert counts == {label: 10 if label != "end" else 11 for label in expected_counts}


async def test_an_update_survives_a_restart(pigeon: Pigeon, url: str) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="kept", subjects=["kept.a"])
        await js.update_stream(name="kept", subjects=["kept.a", "kept.b"], max_msgs=3)
    await pigeon.stop()
    url = await pigeon.start()
    async with client(url) as nc:
        config = (await nc.jetstream(timeout=T).stream_info("kept")).config
        assert (config.subjects, config.max_msgs) == (["kept.a", "kept.b"], 3)


async def test_max_msgs_per_subject_cannot_change(url: str) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="per", subjects=["per.>"])
        refused = await failure(js.update_stream(name="per", subjects=["per.>"], max_msgs_per_subject=3))
        assert refused == (500, 10052, "stream configuration update can not change max messages per subject")


# -- backoff ---------------------------------------------------------------------------------------


async def test_backoff_spaces_redeliveries(url: str, pigeon: Pigeon) -> None:
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="bo", subjects=["bo"])
        too_few = await failure(
            js.add_consumer("bo", durable_name="x", backoff=[0.1, 0.2, 0.3], max_deliver=2)
        )
        assert too_few == (400, 10116, "max deliver is required to be > length of backoff values")
        info = await js.add_consumer("bo", durable_name="c", backoff=[0.3, 0.9], max_deliver=3, ack_wait=10)
        assert (info.config.backoff, info.config.ack_wait, info.config.max_deliver) == ([0.3, 0.9], 0.3, 3)
        assert pigeon.engine is not None
        group = pigeon.engine.group("bo", "c").config
        assert group.backoff is not None and group.backoff.delays_s == pytest.approx((0.0, 0.6))
        await js.publish("bo", b"retry me")
        sub = await js.pull_subscribe_bind("c", stream="bo")
        times = []
        for _ in range(3):
            msg = (await sub.fetch(1, timeout=3))[0]
            times.append(time.monotonic())
        assert msg.metadata.num_delivered == 3
        assert 0.25 < times[1] - times[0] < 0.7
        assert 0.85 < times[2] - times[1] < 1.5
        with pytest.raises(nats.errors.TimeoutError):  # max_deliver reached
            await sub.fetch(1, timeout=1.2)
