"""The registry's REST API over real HTTP: every refusal is a 4xx with Confluent's code, never a 500."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pigeon.server.registry import RegistryOptions, running
from pigeon.testing.services import unique_name

CT = "application/vnd.schemaregistry.v1+json"


def record(name: str, *fields: tuple[str, Any], default: dict[str, Any] | None = None) -> str:
    entries = [{"name": field, "type": kind} | ((default or {}).get(field, {})) for field, kind in fields]
    return json.dumps({"type": "record", "name": name, "fields": entries})


V1 = record("User", ("name", "string"))
V2 = record("User", ("name", "string"), ("age", "int"), default={"age": {"default": 0}})
V2_NO_DEFAULT = record("User", ("name", "string"), ("age", "int"))


@contextlib.asynccontextmanager
async def serve(data: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The registry on a free port over ``data``, and a client for it."""
    async with running(RegistryOptions(data=data, port=0)) as http, httpx.AsyncClient(base_url=http.url) as c:
        yield c


@pytest.fixture
async def client(data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(data_dir) as c:
        yield c


async def register(client: httpx.AsyncClient, subject: str, schema: str, **extra: Any) -> httpx.Response:
    return await client.post(f"/subjects/{subject}/versions", json={"schema": schema} | extra)


def assert_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code, body
    assert isinstance(body["message"], str) and body["message"]


async def test_root_types_and_content_type(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.json() == {}
    assert response.headers["content-type"].startswith(CT)
    assert "AVRO" in (await client.get("/schemas/types")).json()


async def test_register_fetch_and_ids(client: httpx.AsyncClient) -> None:
    subject, other = unique_name("s"), unique_name("s")
    first = await register(client, subject, V1)
    assert first.status_code == 200, first.text
    schema_id = first.json()["id"]
    # Whitespace does not make a new schema; the same schema elsewhere shares the id.
    again = await register(client, subject, json.dumps(json.loads(V1), indent=4))
    assert (again.json()["id"], again.json()["version"]) == (schema_id, 1)
    elsewhere = await register(client, other, V1)
    assert (elsewhere.json()["id"], elsewhere.json()["version"]) == (schema_id, 1)

    by_id = (await client.get(f"/schemas/ids/{schema_id}")).json()
    assert json.loads(by_id["schema"]) == json.loads(V1)
    assert "schemaType" not in by_id
    raw = await client.get(f"/schemas/ids/{schema_id}/schema")
    assert json.loads(raw.text) == json.loads(V1)
    assert (await client.get(f"/schemas/ids/{schema_id}/subjects")).json() == sorted([subject, other])
    versions = (await client.get(f"/schemas/ids/{schema_id}/versions")).json()
    assert {"subject": subject, "version": 1} in versions

    v2 = (await register(client, subject, V2)).json()
    assert v2["version"] == 2 and v2["id"] != schema_id
    for version in ("2", "latest", "-1"):
        got = (await client.get(f"/subjects/{subject}/versions/{version}")).json()
        assert (got["subject"], got["version"], got["id"]) == (subject, 2, v2["id"])
    assert (await client.get(f"/subjects/{subject}/versions")).json() == [1, 2]
    looked_up = await client.post(f"/subjects/{subject}", json={"schema": V1})
    assert (looked_up.json()["version"], looked_up.json()["id"]) == (1, schema_id)
    assert subject in (await client.get("/subjects")).json()


async def test_compatibility_levels(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    await register(client, subject, V1)
    refused = await register(client, subject, V2_NO_DEFAULT)
    assert_error(refused, 409, 40901)
    assert "/fields/1" in refused.json()["message"]

    check = await client.post(
        f"/compatibility/subjects/{subject}/versions/latest?verbose=True", json={"schema": V2_NO_DEFAULT}
    )
    assert check.json()["is_compatible"] is False and check.json()["messages"]
    check = await client.post(f"/compatibility/subjects/{subject}/versions", json={"schema": V2})
    assert check.json() == {"is_compatible": True}

    # FORWARD: the old schema must read the new one's data, so adding a field without a
    # default is fine and removing one without a default is not.
    put = await client.put(f"/config/{subject}", json={"compatibility": "forward"})
    assert put.json() == {"compatibility": "FORWARD"}
    assert (await register(client, subject, V2_NO_DEFAULT)).status_code == 200
    assert_error(await register(client, subject, record("User", ("age", "int"))), 409, 40901)

    await client.put(f"/config/{subject}", json={"compatibility": "NONE"})
    assert (await register(client, subject, record("User", ("x", "boolean")))).status_code == 200


async def test_transitive_levels_check_every_version(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    await client.put(f"/config/{subject}", json={"compatibility": "NONE"})
    await register(client, subject, record("R", ("a", "int")))
    await register(client, subject, record("R", ("a", "long")))
    newest = record("R", ("a", "long"), ("b", "int"), default={"b": {"default": 1}})
    # Reading a long written as int is a promotion; the reverse is not, so FORWARD against
    # version 2 passes and FORWARD_TRANSITIVE fails on version 1.
    await client.put(f"/config/{subject}", json={"compatibility": "FORWARD"})
    check = await client.post(f"/compatibility/subjects/{subject}/versions", json={"schema": newest})
    assert check.json()["is_compatible"] is True
    await client.put(f"/config/{subject}", json={"compatibility": "FORWARD_TRANSITIVE"})
    check = await client.post(
        f"/compatibility/subjects/{subject}/versions?verbose=true", json={"schema": newest}
    )
    assert check.json()["is_compatible"] is False
    assert "version 1" in check.json()["messages"][0]


async def test_config_and_mode(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    assert (await client.get("/config")).json() == {"compatibilityLevel": "BACKWARD"}
    assert_error(await client.get(f"/config/{subject}"), 404, 40408)
    got = await client.get(f"/config/{subject}?defaultToGlobal=TRUE")
    assert got.json() == {"compatibilityLevel": "BACKWARD"}
    await client.put(f"/config/{subject}", json={"compatibility": "FULL"})
    assert (await client.get(f"/config/{subject}")).json() == {"compatibilityLevel": "FULL"}
    assert (await client.delete(f"/config/{subject}")).json() == {"compatibilityLevel": "FULL"}
    assert_error(await client.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)

    assert (await client.get("/mode")).json() == {"mode": "READWRITE"}
    assert_error(await client.get(f"/mode/{subject}"), 404, 40409)
    assert (await client.put(f"/mode/{subject}", json={"mode": "READONLY"})).json() == {"mode": "READONLY"}
    assert_error(await register(client, subject, V1), 422, 42205)
    assert_error(await client.put(f"/mode/{subject}", json={"mode": "WRITEONLY"}), 422, 42204)
    assert (await client.delete(f"/mode/{subject}")).json() == {"mode": "READONLY"}
    assert (await register(client, subject, V1)).status_code == 200


async def test_import_mode_keeps_given_ids(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    assert_error(await register(client, subject, V1, id=500), 422, 42205)
    assert (await client.put(f"/mode/{subject}", json={"mode": "IMPORT"})).status_code == 200
    imported = await register(client, subject, V1, id=500, version=7)
    assert (imported.json()["id"], imported.json()["version"]) == (500, 7)
    assert_error(await register(client, subject, V2_NO_DEFAULT, id=500), 422, 42207)
    assert (await client.get("/schemas/ids/500")).status_code == 200


async def test_soft_and_permanent_delete(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    schema_id = (await register(client, subject, V1)).json()["id"]
    await register(client, subject, V2)
    assert_error(await client.delete(f"/subjects/{subject}/versions/1?permanent=true"), 404, 40407)
    assert (await client.delete(f"/subjects/{subject}/versions/1")).json() == 1
    assert_error(await client.delete(f"/subjects/{subject}/versions/1"), 404, 40406)
    assert_error(await client.get(f"/subjects/{subject}/versions/1"), 404, 40402)
    assert (await client.get(f"/subjects/{subject}/versions/1?deleted=true")).json()["id"] == schema_id
    assert (await client.get(f"/subjects/{subject}/versions")).json() == [2]
    assert (await client.get(f"/subjects/{subject}/versions?deleted=true")).json() == [1, 2]
    assert (await client.delete(f"/subjects/{subject}/versions/1?permanent=true")).json() == 1

    assert_error(await client.delete(f"/subjects/{subject}?permanent=true"), 404, 40405)
    assert (await client.delete(f"/subjects/{subject}")).json() == [2]
    assert_error(await client.delete(f"/subjects/{subject}"), 404, 40404)
    assert subject not in (await client.get("/subjects")).json()
    assert subject in (await client.get("/subjects?deleted=true")).json()
    assert_error(await client.get(f"/subjects/{subject}/versions"), 404, 40401)
    assert (await client.delete(f"/subjects/{subject}?permanent=true")).json() == [2]
    assert subject not in (await client.get("/subjects?deleted=true")).json()
    assert_error(await client.get(f"/schemas/ids/{schema_id}"), 404, 40403)
    # After a permanent delete the subject starts over; the schema keeps its id.
    again = (await register(client, subject, V1)).json()
    assert (again["version"], again["id"]) == (1, schema_id)


async def test_references(client: httpx.AsyncClient) -> None:
    address_subject, user_subject = unique_name("address"), unique_name("user")
    address = json.dumps(
        {
            "type": "record",
            "name": "Address",
            "namespace": "shop",
            "fields": [{"name": "city", "type": "string"}],
        }
    )
    user = json.dumps(
        {
            "type": "record",
            "name": "Customer",
            "namespace": "shop",
            "fields": [{"name": "home", "type": "Address"}],
        }
    )
    address_id = (await register(client, address_subject, address)).json()["id"]
    assert_error(await register(client, user_subject, user), 422, 42201)
    reference = {"name": "shop.Address", "subject": address_subject, "version": 1}
    user_response = await register(client, user_subject, user, references=[reference])
    assert user_response.status_code == 200, user_response.text
    user_id = user_response.json()["id"]
    by_id = (await client.get(f"/schemas/ids/{user_id}")).json()
    assert by_id["references"] == [reference]
    assert '"Address"' in by_id["schema"] or "shop.Address" in by_id["schema"]
    assert (await client.get(f"/subjects/{address_subject}/versions/1/referencedby")).json() == [user_id]
    assert_error(await client.delete(f"/subjects/{address_subject}/versions/1"), 422, 42206)
    assert_error(await client.delete(f"/subjects/{address_subject}"), 422, 42206)
    await client.delete(f"/subjects/{user_subject}")
    await client.delete(f"/subjects/{user_subject}?permanent=true")
    assert (await client.delete(f"/subjects/{address_subject}")).json() == [1]
    assert address_id


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/schemas/ids/999999", None, 404, 40403),
        ("GET", "/schemas/ids/abc", None, 404, 40403),
        ("GET", "/schemas/ids/0", None, 404, 40403),
        ("GET", "/schemas/ids/99999999999999999999", None, 404, 40403),
        ("GET", "/subjects/{s}/versions", None, 404, 40401),
        ("GET", "/subjects/{s}/versions/1", None, 404, 40401),
        ("GET", "/subjects/{known}/versions/0", None, 422, 42202),
        ("GET", "/subjects/{known}/versions/abc", None, 422, 42202),
        ("GET", "/subjects/{known}/versions/2147483648", None, 422, 42202),
        ("GET", "/subjects/{known}/versions/5", None, 404, 40402),
        ("DELETE", "/subjects/{s}", None, 404, 40401),
        ("POST", "/subjects/{s}/versions", b"{not json", 400, 400),
        ("POST", "/subjects/{s}/versions", b"\xff\xfe", 400, 400),
        ("POST", "/subjects/{s}/versions", b"[1, 2]", 422, 422),
        ("POST", "/subjects/{s}/versions", b"", 400, 400),
        ("POST", "/subjects/{s}/versions", b'{"schema": 5}', 422, 42201),
        ("POST", "/subjects/{s}/versions", b'{"schema": "{\\"type\\": \\"nope\\"}"}', 422, 42201),
        ("POST", "/subjects/{s}/versions", b'{"schema": "not json"}', 422, 42201),
        ("POST", "/subjects/{s}/versions", b'{"schema": "\\"int\\"", "schemaType": "XML"}', 422, 42201),
        (
            "POST",
            "/subjects/{s}/versions",
            b'{"schema": "{\\"type\\": 7}", "schemaType": "JSON"}',
            422,
            42201,
        ),
        ("POST", "/subjects/{s}/versions", b'{"schema": "message {", "schemaType": "PROTOBUF"}', 422, 42201),
        ("POST", "/subjects/{s}/versions", b'{"schema": "\\"int\\"", "bogus": 1}', 422, 422),
        ("POST", "/subjects/{s}/versions", b'{"schema": "\\"int\\"", "references": 3}', 422, 42201),
        (
            "POST",
            "/subjects/{s}/versions",
            b'{"schema": "\\"int\\"", "references": [{"name": "x"}]}',
            422,
            42201,
        ),
        ("POST", "/subjects/{known}", b'{"schema": "\\"int\\""}', 404, 40403),
        ("POST", "/subjects/{s}", b'{"schema": "\\"int\\""}', 404, 40401),
        ("POST", "/compatibility/subjects/{s}/versions/3", b'{"schema": "\\"int\\""}', 404, 40401),
        ("POST", "/compatibility/subjects/{known}/versions/3", b'{"schema": "\\"int\\""}', 404, 40402),
        ("POST", "/compatibility/subjects/{known}/versions/x", b'{"schema": "\\"int\\""}', 422, 42202),
        ("PUT", "/config", b'{"compatibility": 7}', 422, 42203),
        ("PUT", "/config", b'{"nope": "FULL"}', 422, 422),
        ("PUT", "/mode", b'{"mode": null}', 422, 42204),
        ("GET", "/subjects?deleted=maybe", None, 400, 400),
        ("GET", "/subjects/%FF/versions", None, 400, 400),
        ("GET", "/no/such/thing", None, 404, 404),
        ("PUT", "/subjects", None, 405, 405),
    ],
)
async def test_error_paths(
    client: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int, code: int
) -> None:
    known = unique_name("known")
    await register(client, known, V1)
    url = path.format(s=unique_name("missing"), known=known)
    response = await client.request(method, url, content=body, headers={"content-type": "application/json"})
    assert_error(response, status, code)


async def test_subject_names_are_percent_decoded(client: httpx.AsyncClient) -> None:
    subject = f"{unique_name('s')}/with slash"
    encoded = subject.replace("/", "%2F").replace(" ", "%20")
    assert (await register(client, encoded, V1)).status_code == 200
    assert subject in (await client.get("/subjects")).json()
    assert (await client.get(f"/subjects/{encoded}/versions")).json() == [1]


async def test_octet_stream_bodies_and_associations(client: httpx.AsyncClient) -> None:
    subject = unique_name("s")
    response = await client.post(
        f"/subjects/{subject}/versions",
        content=json.dumps({"schema": V1}).encode(),
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert (await client.get(f"/associations/resources/-/{subject}")).json() == []


async def test_restart_keeps_ids_subjects_and_deletions(data_dir: Path) -> None:
    subject, gone, dropped = unique_name("s"), unique_name("gone"), unique_name("dropped")
    async with serve(data_dir) as c:
        first = (await register(c, subject, V1)).json()["id"]
        second = (await register(c, subject, V2)).json()["id"]
        await register(c, gone, record("Gone", ("a", "int")))
        await c.delete(f"/subjects/{gone}")
        dropped_id = (await register(c, dropped, record("Dropped", ("b", "int")))).json()["id"]
        await c.delete(f"/subjects/{dropped}")
        await c.delete(f"/subjects/{dropped}?permanent=true")
        await c.put(f"/config/{subject}", json={"compatibility": "FULL"})
    async with serve(data_dir) as c:
        assert (await c.get(f"/subjects/{subject}/versions/1")).json()["id"] == first
        assert (await c.get(f"/subjects/{subject}/versions/2")).json()["id"] == second
        assert (await c.get("/subjects")).json() == [subject]
        assert (await c.get("/subjects?deleted=true")).json() == sorted([subject, gone])
        assert_error(await c.get(f"/schemas/ids/{dropped_id}"), 404, 40403)
        assert (await c.get(f"/config/{subject}")).json() == {"compatibilityLevel": "FULL"}
        third = (await register(c, unique_name("s"), record("New", ("c", "int")))).json()["id"]
        assert third > max(first, second, dropped_id)


async def test_pigeon_serve_mounts_the_registry(data_dir: Path) -> None:
    from pigeon.server.serve import ServeOptions
    from pigeon.server.serve import running as serve_running

    subject = unique_name("s")
    async with serve_running(ServeOptions(data=data_dir, port=0, http_port=0)) as parts:
        # A server whose registry was never written to keeps no registry stream.
        assert "_schemas" not in parts.engine.streams()
        async with httpx.AsyncClient(base_url=f"{parts.http.url}/registry") as c:
            assert (await c.get("/")).json() == {}
            encoded = f"{subject}%2Fx"
            schema_id = (await register(c, encoded, V1)).json()["id"]
            assert (await c.get(f"/subjects/{encoded}/versions/latest")).json()["id"] == schema_id
            assert (await c.get("/subjects")).json() == [f"{subject}/x"]
            assert_error(await c.get("/schemas/ids/77"), 404, 40403)
