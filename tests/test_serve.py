"""`pigeon serve` as a real process: start, serve NATS and HTTP, stop on signals, refuse
user mistakes with one line, and lose nothing acknowledged when killed mid-load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pigeon.server.listener import GRACEFUL_STOP_S
from serve_process import README_RUN, Served, T

WORKER = Path(__file__).resolve().parent / "serve_load_worker.py"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def served(data: Path) -> Iterator[Served]:
    server = Served(data).wait_listening()
    yield server
    server.kill()


def run_exits(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", "serve", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=T,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


async def test_serves_core_nats_jetstream_and_healthz(served: Served) -> None:
    assert served.port > 0 and served.http_url.startswith("http://127.0.0.1:")
    nc = await nats.connect(served.nats_url, connect_timeout=T)
    try:
        sub = await nc.subscribe("core.>")
        await nc.publish("core.x", b"hello")
        assert (await sub.next_msg(T)).data == b"hello"

        js = nc.jetstream(timeout=T)
        await js.add_stream(name="orders", subjects=["orders.>"])
        ack = await js.publish("orders.1", b"one")
        assert (ack.stream, ack.seq) == ("orders", 1)
        pull = await js.pull_subscribe("orders.>", durable="d", stream="orders")
        [msg] = await pull.fetch(1, timeout=T)
        assert msg.data == b"one"
        await msg.ack_sync(timeout=T)
        assert (await js.consumer_info("orders", "d")).num_ack_pending == 0

        async with httpx.AsyncClient(timeout=T) as http:
            response = await http.get(f"{served.http_url}/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "nats_port": served.port, "streams": 1}
    finally:
        await nc.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_cleanly_and_data_survives_a_restart(data: Path, signum: int) -> None:
    first = Served(data).wait_listening()
    try:
        nc = await nats.connect(first.nats_url, connect_timeout=T)
        js = nc.jetstream(timeout=T)
        await js.add_stream(name="kept", subjects=["kept.>"])
        for i in range(5):
            await js.publish("kept.x", str(i).encode())
        await nc.close()
        started = time.monotonic()
        assert first.stop(signum) == 0, first.stderr()
        assert time.monotonic() - started < 5
        assert "Traceback" not in first.stderr()
    finally:
        first.kill()

    second = Served(data, first.port).wait_listening()
    try:
        assert second.port == first.port
        nc = await nats.connect(second.nats_url, connect_timeout=T)
        js = nc.jetstream(timeout=T)
        assert (await js.stream_info("kept")).state.messages == 5
        pull = await js.pull_subscribe("kept.>", durable="r", stream="kept")
        assert [m.data for m in await pull.fetch(5, timeout=T)] == [b"0", b"1", b"2", b"3", b"4"]
        await nc.close()
        assert second.stop() == 0
    finally:
        second.kill()


def test_clients_stalled_mid_request_do_not_keep_it_from_stopping(served: Served) -> None:
    """A client that sent half an HTTP request, and one that sent half a NATS PUB, are cut off
    after the grace period; the server stops without them."""
    host, http_port = served.http_url.removeprefix("http://").split(":")
    with (
        socket.create_connection((host, int(http_port)), timeout=T) as http,
        socket.create_connection(("127.0.0.1", served.port), timeout=T) as client,
    ):
        http.sendall(b"POST /api/streams HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        client.recv(4096)  # INFO
        client.sendall(b"CONNECT {}\r\nPUB half 10\r\nabc")
        time.sleep(0.3)
        started = time.monotonic()
        assert served.stop() == 0, served.stderr()
        assert time.monotonic() - started < GRACEFUL_STOP_S + 3
    assert "Traceback" not in served.stderr()


def test_second_instance_on_the_same_data_dir_is_refused(served: Served, data: Path) -> None:
    line = one_line_error(run_exits(data, "--port", "0", "--http-port", "0"))
    assert f"in use by process {served.process.pid}" in line


def test_ports_in_use_are_refused(served: Served, tmp_path: Path) -> None:
    line = one_line_error(run_exits(tmp_path / "other", "--port", str(served.port), "--http-port", "0"))
    assert f"127.0.0.1:{served.port}" in line and "in use" in line
    http_port = served.http_url.rsplit(":", 1)[1]
    line = one_line_error(run_exits(tmp_path / "other", "--port", "0", "--http-port", http_port))
    assert f"HTTP on 127.0.0.1:{http_port}" in line and "in use" in line


def test_bad_arguments_get_one_line(tmp_path: Path) -> None:
    assert "--port" in one_line_error(run_exits(tmp_path, "--port", "nope"))
    assert "--http-port" in one_line_error(run_exits(tmp_path, "--http-port", "70000"))
    assert "--busy-poll" in one_line_error(run_exits(tmp_path, "--busy-poll", "10001"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def test_busy_poll_serves_and_costs_nothing_while_idle(data: Path) -> None:
    server = Served(data, 0, "--busy-poll", "10000").wait_listening()
    try:
        nc = await nats.connect(server.nats_url, connect_timeout=T)
        try:
            js = nc.jetstream(timeout=T)
            await js.add_stream(name="polled", subjects=["polled.>"])
            for n in range(1, 51):
                assert (await js.publish("polled.x", b"%d" % n)).seq == n
            # Busy, then idle: after the window (10 ms) it sleeps, so a second of
            # silence costs next to no CPU time.
            await asyncio.sleep(0.1)
            before = cpu_seconds(server.process.pid)
            await asyncio.sleep(1.0)
            assert cpu_seconds(server.process.pid) - before < 0.2
        finally:
            await nc.close()
    finally:
        assert server.stop() == 0


# -- crash test ----------------------------------------------------------------------------

STREAM, SUBJECT, DURABLE = "load", "load.data", "workers"
CYCLES = 4
LOAD_S = 1.5


def workers(url: str, out: Path, cycle: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for n in range(2):
        args = ["publish", url, SUBJECT, str(out / f"pub{n}"), f"p{n}c{cycle}"]
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args]))
    for n in range(2):
        args = ["consume", url, STREAM, DURABLE, str(out / f"con{n}")]
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args]))
    return procs


async def create_stream(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=T)
    js = nc.jetstream(timeout=T)
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=1)
    )
    await nc.close()


async def read_back(url: str, durable: str, config: ConsumerConfig | None, want: set[str]) -> list[str]:
    """Ids ``durable`` delivers (acking them) until ``want`` is covered and nothing more comes."""
    nc = await nats.connect(url, connect_timeout=T)
    js = nc.jetstream(timeout=T)
    if config is not None:
        await js.add_consumer(STREAM, config)
    sub = await js.pull_subscribe_bind(durable, STREAM)
    got: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(500, timeout=2 if want - set(got) else 0.5)
        except TimeoutError:  # nats-py raises asyncio's when the 408 comes after its timeout
            if not want - set(got):
                break
            continue
        for msg in msgs:
            got.append(msg.data.decode())
            await msg.ack()
    await nc.close()
    return got


def lines(out: Path, prefix: str) -> list[str]:
    return [line for f in sorted(out.glob(prefix + "*")) for line in f.read_text().splitlines()]


def test_sigkill_mid_load_loses_nothing_acknowledged(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    server = Served(data).wait_listening()
    port = server.port
    asyncio.run(create_stream(server.nats_url))
    for cycle in range(CYCLES):
        procs = workers(server.nats_url, out, cycle)
        try:
            time.sleep(LOAD_S)
            server.kill()
            assert server.process.returncode == -signal.SIGKILL
            time.sleep(0.2)  # the clients see the server gone mid-request
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(T)
        server = Served(data, port).wait_listening()
    try:
        published = dict(line.split() for line in lines(out, "pub"))
        consumed = lines(out, "con")
        acked = {line[4:] for line in consumed if line.startswith("ack ")}
        tried = {line[4:] for line in consumed if line.startswith("try ")}
        assert len(published) > 100 and len(acked) > 50, (len(published), len(acked))

        everything = ConsumerConfig(
            durable_name="audit", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL
        )
        stored = asyncio.run(read_back(server.nats_url, "audit", everything, set(published)))
        assert set(published) <= set(stored), sorted(set(published) - set(stored))[:10]

        # What the consumers did not get a confirmed ack for is still delivered to the group,
        # apart from acks the server may have applied just before it was killed.
        unacked = set(published) - acked
        rest = asyncio.run(read_back(server.nats_url, DURABLE, None, unacked - tried))
        lost = unacked - set(rest)
        assert lost <= tried - acked, sorted(lost - tried)[:10]
        assert len(lost) <= CYCLES * 2 * 20, len(lost)  # at most one fetched batch per consumer and kill
        assert server.stop() == 0
    finally:
        server.kill()


async def test_the_demo_fills_streams_groups_lag_and_dead_letters(data: Path) -> None:
    """The README's run command, `bash scripts/run`: pigeon serve --demo, something real flowing."""
    # The script checks the environment first (and would install it): a slower start.
    served = Served(data, 0, command=README_RUN).wait_listening(timeout=120)
    try:
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            dashboard = await http.get("/")
            assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
            seen: dict[str, object] = {}
            for _ in range(300):
                streams = {s["name"]: s for s in (await http.get("/api/streams")).json()["streams"]}
                orders = streams.get("demo-orders")
                if orders and {"billing", "shipping", "revenue-projection"} <= set(orders["groups"]):
                    letters = (await http.get("/api/streams/demo-orders/groups/billing/dead-letters")).json()
                    seen = {"messages": orders["messages"], "letters": letters["total"]}
                    if letters["total"]:
                        break
                await asyncio.sleep(0.1)
            assert seen.get("messages") and seen.get("letters"), seen
            wanted = 'kafka_consumergroup_lag{consumergroup="shipping",partition="0",topic="demo-orders"}'
            for _ in range(150):  # the lag sampler runs every 5 s
                if wanted in (await http.get("/metrics")).text:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the demo's lag never reached /metrics")
    finally:
        assert served.stop(signal.SIGINT) == 0, served.stderr()
    assert "demo order pipeline running" in served.stderr()
