"""The admin API of `pigeon serve`, over real HTTP against an in-process server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pigeon.errors import InvalidConfigError
from pigeon.server.serve import Running, ServeOptions, running
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, Transport

TOKEN = "s3cret"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    options = ServeOptions(data=tmp_path / "data", port=0, http_port=0, sample_interval_s=0.05)
    async with running(options) as parts:
        yield parts


@pytest.fixture
async def http(served: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.http.url) as client:
        yield client


@pytest.fixture
async def transport(served: Running) -> AsyncIterator[Transport]:
    opened = await connect(served.nats.url)
    yield opened
    await opened.close()


def error_of(reply: httpx.Response) -> tuple[int, str]:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return reply.status_code, body["error"]["code"]


async def test_streams_create_info_purge_delete(http: httpx.AsyncClient, transport: Transport) -> None:
    created = await http.post(
        "/api/streams", json={"name": "orders", "subjects": ["orders.>"], "partitions": 2}
    )
    assert created.status_code == 201 and created.json()["config"]["partitions"] == 2
    assert error_of(await http.post("/api/streams", json={"name": "orders", "subjects": ["x.>"]})) == (
        409,
        "stream_exists",
    )
    for i in range(6):
        await transport.publish("orders.new", b'{"n": %d}' % i, key=f"k{i}")
    info = (await http.get("/api/streams/orders")).json()
    assert info["messages"] == 6 and len(info["partitions"]) == 2
    assert sum(p["next_offset"] for p in info["partitions"]) == 6
    assert [s["name"] for s in (await http.get("/api/streams")).json()["streams"]] == ["orders"]
    assert (await http.post("/api/streams/orders/purge")).json()["messages"] == 0
    assert (await http.delete("/api/streams/orders")).status_code == 200
    assert error_of(await http.get("/api/streams/orders")) == (404, "stream_not_found")


async def test_browse_messages_by_offset_and_time(http: httpx.AsyncClient, transport: Transport) -> None:
    await http.post("/api/streams", json={"name": "log", "subjects": ["log.>"]})
    for i in range(5):
        await transport.publish("log.line", b'{"i": %d}' % i)
    middle = time.time()
    await transport.publish("log.line", b"plain text")
    await transport.publish("log.line", b"\xff\xfe")
    page = (await http.get("/api/streams/log/messages", params={"offset": 1, "limit": 3})).json()
    assert [m["offset"] for m in page["messages"]] == [1, 2, 3] and page["next_offset"] == 4
    assert page["messages"][0]["encoding"] == "json" and page["messages"][0]["payload"] == {"i": 1}
    later = (await http.get("/api/streams/log/messages", params={"since": middle})).json()["messages"]
    assert [(m["encoding"], m["payload"]) for m in later] == [("text", "plain text"), ("base64", "//4=")]
    one = (await http.get("/api/streams/log/messages/0/4")).json()
    assert one["payload"] == {"i": 4}
    assert error_of(await http.get("/api/streams/log/messages/0/99")) == (404, "message_not_found")
    assert error_of(await http.get("/api/streams/log/messages", params={"partition": 5}))[0] == 400


async def test_groups_lag_health_and_reset(
    http: httpx.AsyncClient, transport: Transport, served: Running
) -> None:
    await http.post("/api/streams", json={"name": "pay", "subjects": ["pay.>"]})
    for i in range(10):
        await transport.publish("pay.x", b"%d" % i)
    consumer = await transport.consumer("pay", ConsumerSpec("ledger", kind="ordered"))
    for received in await consumer.fetch(4, 2):
        await received.ack()
    group = (await http.get("/api/streams/pay/groups/ledger")).json()
    assert group["kind"] == "ordered" and group["lag"] == 6 and len(group["members"]) == 1
    assert (await http.get("/api/streams/pay/groups/ledger/lag")).json()["partitions"][0]["committed"] == 4
    assert (await http.get("/api/streams/pay/groups/ledger/health")).json()["status"] in {"OK", "WARN", "ERR"}
    busy = await http.post("/api/streams/pay/groups/ledger/reset", json={"to": "earliest"})
    assert error_of(busy)[0] == 409  # a member is connected
    await consumer.close()
    moved = await http.post("/api/streams/pay/groups/ledger/reset", json={"to": "offset", "value": 8})
    assert moved.status_code == 200 and moved.json()["lag"] == 2
    assert (
        error_of(await http.post("/api/streams/pay/groups/ledger/reset", json={"to": "sideways"}))[0] == 422
    )
    assert error_of(await http.get("/api/streams/pay/groups/nope")) == (404, "group_not_found")
    health = (await http.get("/api/health")).json()
    assert {(g["stream"], g["group"]) for g in health["groups"]} == {("pay", "ledger")}


async def test_dead_letters_list_show_redrive_purge(http: httpx.AsyncClient, transport: Transport) -> None:
    await http.post("/api/streams", json={"name": "mail", "subjects": ["mail.>"]})
    for i in range(3):
        await transport.publish("mail.send", b"%d" % i)
    consumer = await transport.consumer("mail", ConsumerSpec("sender"))
    for received in await consumer.fetch(3, 2):
        await received.term(ValueError(f"bad address {received.message.payload.decode()}"))
    await consumer.close()
    base = "/api/streams/mail/groups/sender/dead-letters"
    listed: dict[str, Any] = {}
    for _ in range(50):
        listed = (await http.get(base)).json()
        if listed["total"] == 3:
            break
    assert listed["total"] == 3 and listed["dead_letters"][0]["error_type"] == "ValueError"
    only = (await http.get(base, params={"contains": "address 1"})).json()["dead_letters"]
    assert len(only) == 1
    shown = (await http.get(f"{base}/{only[0]['id']}")).json()
    assert shown["message"]["payload"] == 1 and shown["error_message"] == "bad address 1"
    assert error_of(await http.get(f"{base}/nope:0")) == (404, "dead_letter_not_found")
    assert (await http.post(f"{base}/redrive", json={"ids": [only[0]["id"]]})).json() == {"redriven": 1}
    assert (await http.get("/api/streams/mail")).json()["messages"] == 4  # back in its stream
    assert error_of(await http.post(f"{base}/purge", json={"all": True}))[0] == 422  # no confirmation
    assert (await http.post(f"{base}/purge", json={"all": True, "confirm": True})).json() == {"purged": 2}
    assert (await http.get(base)).json()["total"] == 0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/streams", b"not json"),
        ("POST", "/api/streams", b"[]"),
        ("POST", "/api/streams", b'{"name": "x"}'),
        ("POST", "/api/streams", b'{"name": "bad name", "subjects": ["a"]}'),
        ("POST", "/api/streams", b'{"name": "x", "subjects": ["a b"]}'),
        ("POST", "/api/streams", b'{"name": "x", "subjects": ["a"], "partitions": "two"}'),
        ("POST", "/api/streams", b'{"name": "x", "subjects": ["a"], "partitions": true}'),
        ("GET", "/api/streams/missing", None),
        ("GET", "/api/streams/missing/messages?offset=abc", None),
        ("GET", "/api/streams/missing/groups/g/dead-letters", None),
        ("POST", "/api/streams/missing/groups/g/dead-letters/redrive", b"{}"),
        ("POST", "/api/streams/missing/purge", None),
        ("DELETE", "/api/streams/missing", None),
        ("GET", "/api/streams/missing/messages/0/-1.2e-105", None),  # no route takes it
        ("GET", "/api/no/such/thing", None),
        ("PATCH", "/api/streams", b"{}"),
    ],
)
async def test_bad_requests_are_4xx_with_a_json_error(
    http: httpx.AsyncClient, method: str, path: str, body: bytes | None
) -> None:
    reply = await http.request(method, path, content=body)
    status, _ = error_of(reply)
    assert 400 <= status < 500, reply.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("PATCH", "/registry/subjects", 405), ("GET", "/registry/subjects/a%0Ab/versions", 404)],
)
async def test_the_mounted_registry_answers_in_its_own_error_shape(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    reply = await http.request(method, path, content=b"{}" if method == "PATCH" else None)
    assert reply.status_code == status
    assert reply.json()["error_code"] == status and reply.json()["message"]


async def test_the_openapi_document_lists_every_route(http: httpx.AsyncClient, served: Running) -> None:
    document = (await http.get("/api/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    served_paths = {
        route.path.replace(":int", "")
        for route in served.http._server.config.app.routes
        if route.path.startswith("/api/")
    }
    assert served_paths == set(document["paths"])


async def test_a_token_guards_every_call(tmp_path: Path) -> None:
    options = ServeOptions(data=tmp_path / "data", port=0, http_port=0, token=TOKEN)
    async with running(options) as served, httpx.AsyncClient(base_url=served.http.url) as http:
        assert error_of(await http.get("/api/streams")) == (401, "unauthorized")
        assert error_of(await http.get("/api/streams", headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert (
            await http.get("/api/streams", headers={"Authorization": f"Bearer {TOKEN}"})
        ).status_code == 200


async def test_no_token_means_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="without a token"):
        async with running(ServeOptions(data=tmp_path / "data", host="0.0.0.0", port=0, http_port=0)):
            pass


async def test_a_shared_group_without_members_starts_over(
    http: httpx.AsyncClient, transport: Transport
) -> None:
    await http.post("/api/streams", json={"name": "jobs", "subjects": ["jobs.>"]})
    for i in range(6):
        await transport.publish("jobs.x", b"%d" % i)
    consumer = await transport.consumer("jobs", ConsumerSpec("workers", max_deliver=7))
    for received in await consumer.fetch(6, 2):
        await received.ack()
    await consumer.close()
    assert (await http.get("/api/streams/jobs/groups/workers")).json()["lag"] == 0
    reset = await http.post("/api/streams/jobs/groups/workers/reset", json={"to": "offset", "value": 2})
    assert reset.status_code == 200, reset.text
    group = reset.json()
    assert group["lag"] == 4 and group["kind"] == "shared" and group["config"]["max_deliver"] == 7
