"""The `pigeon` command line as processes, against real brokers: data folders (file://), the
machine's NATS for core messaging, and a `pigeon serve` process. Counts stay small: every
command is a Python start-up."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import Background, cli, groups_of, make_folder, ok
from pigeon.engine import Engine
from pigeon.errors import UnsupportedFeatureError
from pigeon.testing.services import reachable, require_service, unique_name
from pigeon.transport import connect
from pigeon.transport.base import StreamSpec, Transport


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_completion_and_help_list_every_command() -> None:
    # What `pigeon --show-completion` prints for the shell it runs in, asked for bash by name.
    script = cli(env={"_PIGEON_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_pigeon_completion" in script.stdout and "complete " in script.stdout
    # And what the shell then asks, as bash would: the words so far, the one being completed.
    asked = {"_PIGEON_COMPLETE": "complete_bash", "COMP_WORDS": "pigeon dlq re", "COMP_CWORD": "2"}
    assert cli(env=asked).stdout.split() == ["redrive"]
    help_text = ok("--help")
    for command in (
        "pub",
        "sub",
        "req",
        "reply",
        "stream",
        "consume",
        "replay",
        "lag",
        "dlq",
        "bench",
        "demo",
        "serve",
        "exporter",
        "registry",
        "es",
    ):
        assert f" {command} " in help_text


def test_streams_and_publishing_on_a_data_folder(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'data'}"
    name = unique_name("s")
    limits = ["--partitions", "2", "--max-age", "7d", "--max-bytes", "64M", "--dedup-window", "1m"]
    added = ok("stream", "add", name, "-s", f"{name}.>", *limits, "--url", url)
    assert f"stream {name} created" in added and "2 partitions" in added
    ack = json.loads(ok("pub", f"{name}.a", '{"n": {n}}', "--key", "k", "-H", "a=b", "--url", url, "--json"))
    assert ack["stored"] and ack["stream"] == name and ack["offset"] == 0 and not ack["duplicate"]
    many = json.loads(ok("pub", f"{name}.a", "m{n}", "--count", "30", "--id", "x{n}", "--url", url, "--json"))
    assert many["published"] == many["stored"] == 30 and many["duplicates"] == 0
    again = ok("pub", f"{name}.a", "m1", "--id", "x1", "--url", url)
    assert again.startswith("duplicate, already stored in stream")
    assert "core only" in ok("pub", "nobody.listens", "--url", url)
    from_stdin = json.loads(ok("pub", f"{name}.b", "-", "--url", url, "--json", stdin="from stdin"))
    assert from_stdin["stored"]

    folder = ["--data", str(tmp_path / "data")]
    listed = json.loads(ok("stream", "ls", *folder, "--json"))
    assert [(s["name"], s["messages"], s["partitions"]) for s in listed] == [(name, 32, 2)]

    purged = ok("stream", "purge", name, "--yes", "--url", url)
    assert "32 messages removed" in purged
    info = json.loads(ok("stream", "info", name, *folder, "--json"))
    assert info["messages"] == 0 and sum(last + 1 for last in info["last_offsets"]) == 32  # offsets stay
    refused = cli("stream", "rm", name, "--url", url)  # stdin is not a terminal: no prompt, no delete
    assert refused.returncode == 1 and "--yes" in refused.stderr
    ok("stream", "rm", name, "--yes", "--url", url)
    assert "0 streams" in ok("stream", "ls", *folder)  # the table's title


def test_consume_acks_and_no_ack_gives_them_back(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=1, messages=10)
    url = f"file://{folder}"
    first = lines(ok("consume", name, "--group", "g", "--count", "3", "--url", url, "--json"))
    assert [m["payload"] for m in first] == ["m0", "m1", "m2"]
    held = lines(ok("consume", name, "--group", "g", "--count", "2", "--no-ack", "--url", url, "--json"))
    again = lines(ok("consume", name, "--group", "g", "--count", "2", "--url", url, "--json"))
    assert [m["payload"] for m in held] == [m["payload"] for m in again] == ["m3", "m4"]
    assert [m["delivery_count"] for m in again] == [2, 2]
    lag = json.loads(ok("lag", name, "g", "--data", str(folder), "--json"))
    assert lag["lag"] == 5
    late_args = ["--group", "late", "--kind", "ordered", "--start", "offset:8", "--timeout", "0.5"]
    late = lines(ok("consume", name, *late_args, "--url", url, "--json"))
    assert [m["payload"] for m in late] == ["m8", "m9"]  # then nothing for 0.5 s: done
    human = ok("consume", name, "--group", "h", "--count", "1", "--url", url)
    assert f"[#1] {name}.new" in human and "key=k0" in human and "m0" in human


def test_replay_to_a_file_and_to_a_subject(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=2, messages=40)
    data = ["--data", str(folder)]
    out = tmp_path / "replayed.jsonl"
    summary = json.loads(ok("replay", name, *data, "--to-file", str(out), "--json"))
    records = lines(out.read_text())
    assert summary["replayed"] == len(records) == 40
    assert {r["payload"] for r in records} == {f"m{i}" for i in range(40)}
    for p in (0, 1):  # each partition in offset order
        offsets = [r["offset"] for r in records if r["partition"] == p]
        assert offsets == sorted(offsets) and offsets[0] == 0

    part = lines(ok("replay", name, *data, "--partition", "1", "--from-offset", "3", "--count", "4"))
    assert [(r["partition"], r["offset"]) for r in part] == [(1, 3), (1, 4), (1, 5), (1, 6)]
    future = lines(ok("replay", name, *data, "--from-time", "2100-01-01T00:00:00Z"))
    assert future == []

    copied = ok("replay", name, *data, "--partition", "0", "--to-subject", f"{name}.copy")
    assert "to subject" in copied
    state = json.loads(ok("stream", "info", name, *data, "--json"))
    assert state["messages"] == 40 + sum(1 for r in records if r["partition"] == 0)
    assert groups_of(folder, name) == []  # the temporary groups are gone


def test_long_work_shows_progress_bars_on_a_terminal_only(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=2, messages=0, dead=0)
    url = ["--url", f"file://{folder}"]
    terminal = {"FORCE_COLOR": "1"}  # rich then draws as on a terminal

    def bars(done: subprocess.CompletedProcess[str]) -> str:
        assert done.returncode == 0, done.stderr
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", done.stderr).replace("\r", "\n")

    published = bars(cli("pub", f"{name}.new", "m{n}", "--count", "3000", *url, env=terminal))
    assert re.search(r"publishing .* 3000/3000", published), published
    replayed = bars(cli("replay", name, *url, "--to-file", str(tmp_path / "out.jsonl"), env=terminal))
    assert re.search(r"replaying .* 3000/3000", replayed), replayed
    make_folder(tmp_path / "dead", name, partitions=1, messages=150, dead=150)
    redriven = bars(
        cli("dlq", "redrive", name, "billing", "--all", "--url", f"file://{tmp_path / 'dead'}", env=terminal)
    )
    assert re.search(r"redriving .* 150/150", redriven), redriven
    plain = cli("pub", f"{name}.new", "m{n}", "--count", "3000", *url)  # stderr is a pipe here
    assert plain.returncode == 0 and plain.stderr == ""


def test_a_reader_that_goes_away_stops_the_output_quietly(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=1, messages=3000)
    # `pigeon replay | head -1`: the reader closes the pipe after one line of 700 kB.
    process = subprocess.Popen(
        [sys.executable, "-m", "pigeon.cli", "replay", name, "--data", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(timeout=30) == 1
    assert errors == ""


def test_dead_letters_listed_shown_redriven_and_purged(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=1, messages=5, dead=3)
    data, url = ["--data", str(folder)], ["--url", f"file://{folder}"]
    letters = json.loads(ok("dlq", "ls", name, "billing", *data, "--json"))
    assert [(d["error_type"], d["error_message"]) for d in letters] == [
        ("ValueError", "bad m0"),
        ("ValueError", "bad m1"),
        ("ValueError", "bad m2"),
    ]
    first = str(letters[0]["id"])
    assert first in ok("dlq", "ls", name, "billing", *data)  # ids are never cut
    shown = ok("dlq", "show", name, "billing", first, *data)
    assert "ValueError: bad m0" in shown and "m0" in shown
    redriven = json.loads(ok("dlq", "redrive", name, "billing", "--id", first, *url, "--json"))
    assert redriven["redriven"] == 1
    assert json.loads(ok("stream", "info", name, *data, "--json"))["messages"] == 6  # the copy
    gone = cli("dlq", "redrive", name, "billing", "--id", first, *url)
    assert gone.returncode == 1 and "no pending dead letter" in gone.stderr
    assert json.loads(ok("dlq", "purge", name, "billing", "--yes", *url, "--json"))["purged"] == 2
    assert json.loads(ok("dlq", "ls", name, "billing", *data, "--json")) == []


def test_core_pub_sub_and_request_reply_on_nats() -> None:
    url = ["--url", require_service("nats")]
    subject = unique_name("cli").replace("-", "_")
    sub = Background("sub", f"{subject}.>", "--count", "2", "--timeout", "10", *url).wait_listening()
    assert "core only" in ok("pub", f"{subject}.a", '{"x": [1, 2]}', "-H", "trace=7", *url)
    ok("pub", f"{subject}.b", "plain text", "--key", "k1", *url)
    code, out = sub.finish()
    assert code == 0
    assert f"[#1] {subject}.a" in out and "trace: 7" in out and '"x": [' in out  # JSON indented
    assert f"[#2] {subject}.b" in out and "key=k1" in out and "plain text" in out

    reply = Background("reply", f"{subject}.svc", "pong", "--count", "1", *url, "--json").wait_listening()
    answer = json.loads(ok("req", f"{subject}.svc", "ping", *url, "--json"))
    assert answer["payload"] == "pong"
    code, out = reply.finish()
    assert code == 0 and json.loads(out)["payload"] == "ping"
    echo = Background("reply", f"{subject}.echo", "--count", "1", *url).wait_listening()
    assert "hello back" in ok("req", f"{subject}.echo", "hello back", *url)
    assert echo.finish()[0] == 0

    nobody = cli("req", f"{subject}.nobody", *url)
    assert nobody.returncode == 1 and nobody.stderr.startswith("pigeon req: ")


def test_against_pigeon_serve(pigeon_serve_url: str) -> None:
    url = ["--url", pigeon_serve_url]
    name = unique_name("s")
    ok("stream", "add", name, "-s", f"{name}.>", "--partitions", "2", *url)
    try:
        assert (
            json.loads(ok("pub", f"{name}.a", "m{n}", "--count", "20", "--key", "k", *url, "--json"))[
                "stored"
            ]
            == 20
        )
        listed = {s["name"]: s for s in json.loads(ok("stream", "ls", *url, "--json"))}
        assert listed[name]["messages"] == 20 and listed[name]["partitions"] == 2
        got = lines(ok("consume", name, "--group", "g", "--kind", "ordered", "--count", "5", *url, "--json"))
        assert [m["payload"] for m in got] == [f"m{i}" for i in range(1, 6)]  # one key: one partition
        assert json.loads(ok("lag", name, "g", *url, "--json"))["lag"] == 15
        replayed = lines(ok("replay", name, "--from-offset", "10", *url))
        assert [m["payload"] for m in replayed] == [f"m{i}" for i in range(11, 21)]
        assert "20 messages removed" in ok("stream", "purge", name, "--yes", *url)
        bench = json.loads(ok("bench", "--count", "300", "--size", "64", *url, "--json"))
        assert bench["messages"] == 300 and bench["consume"]["msgs_per_s"] > 0
        assert bench["end_to_end_ms"]["p50"] <= bench["end_to_end_ms"]["p99"]
    finally:
        ok("stream", "rm", name, "--yes", *url)
    left = [s["name"] for s in json.loads(ok("stream", "ls", *url, "--json"))]
    assert name not in left and not any(n.startswith("pigeon-bench-") for n in left)


def test_bench_on_a_data_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    result = json.loads(ok("bench", "--count", "500", "--batch", "50", "--url", f"file://{folder}", "--json"))
    assert result["messages"] == 500 and result["transport"] == "embedded"
    assert set(result["end_to_end_ms"]) == {"p50", "p90", "p99", "max"}
    assert json.loads(ok("stream", "ls", "--data", str(folder), "--json")) == []  # cleaned up
    table = ok("bench", "--count", "100", "--url", f"file://{folder}")
    assert "publish (batch ack)" in table and "consume (end to end)" in table


def test_demo_runs_until_interrupted(tmp_path: Path) -> None:
    demo = Background(
        "demo", "--url", f"file://{tmp_path / 'data'}", "--every", "0.5", "--speed", "4", "--json"
    )
    assert demo.process.stdout is not None
    readings = [json.loads(demo.process.stdout.readline()) for _ in range(3)]
    demo.process.send_signal(signal.SIGINT)
    code, rest = demo.finish()
    assert code == 0
    assert readings[-1]["counts"]["published"] > 0 and set(readings[-1]["lag"]) == {
        "billing",
        "shipping",
        "revenue-projection",
    }
    assert all("counts" in json.loads(line) for line in rest.splitlines())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    folder, name = tmp_path / "data", unique_name("s")
    make_folder(folder, name, partitions=2, messages=3)
    data, url = ["--data", str(folder)], ["--url", f"file://{folder}"]
    cases = [
        (["stream", "ls", "--url", f"nats://127.0.0.1:{_closed_port()}"], "pigeon stream ls: cannot reach"),
        (["stream", "info", "nope", *data], "pigeon stream info: no stream named 'nope'"),
        (["stream", "ls", "--data", str(tmp_path / "missing")], "pigeon stream ls: no data folder"),
        (["consume", name, "--group", "g", "--start", "soon", *url], "pigeon consume: Invalid value for"),
        (["pub", "a", "-H", "novalue"], "pigeon pub: Invalid value for '--header'"),
        (["stream", "add", "x", "-s", "x", "--max-age", "5 weeks"], "pigeon stream add: Invalid value for"),
        (["replay", name, "--partition", "7", *data], "pigeon replay: stream"),
        (["dlq", "ls", name, "nobody", *data], "pigeon dlq ls: no group named 'nobody'"),
    ]  # fmt: skip
    if not reachable("127.0.0.1", 4333):  # the default URL, when no pigeon serve runs here
        cases.append((["lag", name, "g"], "pigeon lag: cannot reach nats://127.0.0.1:4333"))
    # One after the other: the commands on the data folder each take its single-owner lock.
    results = [cli(*args) for args, _ in cases]
    for (args, start), done in zip(cases, results, strict=True):
        assert done.returncode != 0, args
        assert done.stderr.startswith(start), (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


def test_a_folder_held_by_a_server_is_said_so(tmp_path: Path) -> None:
    folder = tmp_path / "data"

    async def hold() -> None:
        engine = await Engine.open(folder)  # as a running pigeon serve would
        try:
            done = await asyncio.to_thread(cli, "stream", "ls", "--data", str(folder))
        finally:
            await engine.close()
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
        assert "is held by process" in done.stderr and "--url" in done.stderr

    asyncio.run(hold())


async def test_memory_and_embedded_list_and_purge_streams(tmp_path: Path) -> None:
    for url in ("memory://", f"file://{tmp_path / 'data'}"):
        transport = await connect(url)
        try:
            await transport.create_stream(StreamSpec("b", ("b.>",)))
            await transport.create_stream(StreamSpec("a", ("a.>",)))
            await transport.publish("a.x", b"1")
            await transport.purge_stream("a")
            assert await transport.list_streams() == ["a", "b"]
            assert (await transport.stream_state("a")).messages == 0
        finally:
            await transport.close()


async def test_the_contracts_default_refuses_listing_and_purging() -> None:
    transport = await connect("memory://")
    try:
        # The base class's own methods: what a transport without them answers.
        with pytest.raises(UnsupportedFeatureError, match="memory transport does not support listing"):
            await Transport.list_streams(transport)
        with pytest.raises(UnsupportedFeatureError, match="purging streams"):
            await Transport.purge_stream(transport, "anything")
    finally:
        await transport.close()
