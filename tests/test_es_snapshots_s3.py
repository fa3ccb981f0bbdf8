"""The S3 snapshot store against moto's standalone S3 server, started on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pigeon.engine import Engine
from pigeon.errors import InvalidConfigError
from pigeon.es import Aggregate, EventStore, Repository, Snapshot, SnapshotStoreError, domain_event, handles
from pigeon.testing.services import unique_name

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from pigeon.es.s3 import S3SnapshotStore  # noqa: E402

CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = _free_port()
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def bucket(moto_url: str) -> Iterator[tuple[str, Any]]:
    client = boto3.client("s3", endpoint_url=moto_url, **CREDENTIALS)
    name = unique_name("snap")
    client.create_bucket(Bucket=name)
    yield name, client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", ()):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@domain_event("S3Ticked")
@dataclass(frozen=True)
class Ticked:
    amount: int


class Meter(Aggregate):
    total = 0

    @handles(Ticked)
    def _ticked(self, event: Ticked) -> None:
        self.total += event.amount


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[EventStore]:
    engine = await Engine.open(data_dir)
    yield await EventStore.open(engine, unique_name("es"), durability="never")
    await engine.close()


async def test_snapshots_in_s3_bound_the_replay(
    store: EventStore, bucket: tuple[str, Any], moto_url: str
) -> None:
    name, client = bucket
    snapshots = S3SnapshotStore(name, endpoint_url=moto_url, **CREDENTIALS)
    repo = Repository(store, Meter, snapshots=snapshots, snapshot_every=10)
    meter = Meter("m")
    for i in range(95):
        meter.trigger(Ticked(i))
        await repo.save(meter)
    loaded = await repo.load("m")
    assert loaded.total == sum(range(95)) and loaded.load_info == type(loaded.load_info)(90, 5)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=name)["Contents"]]
    assert keys[0] == "snapshots/Meter/m/00000000000000000010.json" and len(keys) == 9
    old = await repo.load("m", at_version=44)
    assert old.total == sum(range(44)) and old.load_info.snapshot_version == 40


async def test_keep_and_errors(bucket: tuple[str, Any], moto_url: str) -> None:
    name, client = bucket
    snapshots = S3SnapshotStore(name, prefix="p/", keep=2, client=client)
    for version in (1, 2, 3):
        await snapshots.save(Snapshot("Meter", "m", version, float(version), 1, {"total": version}))
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=name)["Contents"]]
    assert keys == ["p/Meter/m/00000000000000000002.json", "p/Meter/m/00000000000000000003.json"]
    assert (await snapshots.latest("Meter", "m", at_time=2.5)).version == 2  # type: ignore[union-attr]
    assert await snapshots.latest("Meter", "m", at_version=1) is None
    assert await snapshots.latest("Meter", "other") is None

    missing = S3SnapshotStore(unique_name("nobucket"), client=client)
    with pytest.raises(SnapshotStoreError, match="NoSuchBucket"):
        await missing.save(Snapshot("Meter", "m", 1, 0.0, 1, {}))
    with pytest.raises(SnapshotStoreError, match="NoSuchBucket"):
        await missing.latest("Meter", "m")
    client.put_object(Bucket=name, Key="p/Meter/m/00000000000000000009.json", Body=b"{broken")
    with pytest.raises(SnapshotStoreError, match="cannot be read"):
        await snapshots.latest("Meter", "m")
    with pytest.raises(InvalidConfigError, match="keep"):
        S3SnapshotStore(name, keep=0, client=client)
