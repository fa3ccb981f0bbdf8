"""Snapshots in an S3-compatible object store, through boto3 (``pip install boto3``).

Objects are ``<prefix>/<type>/<id>/<version>.json`` with the version zero-padded to 20
digits, so listing a folder returns them in version order. boto3 blocks: every call runs in
a worker thread. Credentials and region come from boto3's usual sources unless given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidConfigError, MissingExtraError
from .errors import SnapshotStoreError
from .snapshots import Snapshot, aggregate_path

__all__ = ["S3SnapshotStore"]


class S3SnapshotStore:
    """Snapshots in ``bucket`` under ``prefix``; the newest ``keep`` per aggregate are kept
    (None: all). ``client`` is a boto3 S3 client; without one, ``client_options`` (such as
    ``endpoint_url``, ``region_name``) make one."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "snapshots",
        keep: int | None = None,
        client: Any = None,
        **client_options: Any,
    ) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise InvalidConfigError(f"bucket must be a bucket name, not {bucket!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise InvalidConfigError(f"keep must be a positive integer or None, not {keep!r}")
        if client is None:
            try:
                import boto3  # type: ignore[import-untyped]
            except ImportError:
                raise MissingExtraError("S3SnapshotStore needs boto3: pip install boto3") from None
            client = boto3.client("s3", **client_options)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.keep = keep
        self.client = client

    def _folder(self, aggregate_type: str, aggregate_id: str) -> str:
        return f"{self.prefix}/{aggregate_path(aggregate_type, aggregate_id)}/"

    async def save(self, snapshot: Snapshot) -> None:
        folder = self._folder(snapshot.aggregate_type, snapshot.aggregate_id)
        await asyncio.to_thread(self._save, folder, snapshot.version, snapshot.to_bytes())

    def _save(self, folder: str, version: int, data: bytes) -> None:
        with self._errors("write a snapshot to"):
            self.client.put_object(Bucket=self.bucket, Key=f"{folder}{version:020d}.json", Body=data)
            if self.keep is not None:
                old = self._keys(folder)[: -self.keep]
                for start in range(0, len(old), 1000):  # the most one DeleteObjects call takes
                    objects = [{"Key": key} for key in old[start : start + 1000]]
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    async def latest(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        at_version: int | None = None,
        at_time: float | None = None,
    ) -> Snapshot | None:
        folder = self._folder(aggregate_type, aggregate_id)
        return await asyncio.to_thread(self._find, folder, at_version, at_time)

    def _find(self, folder: str, at_version: int | None, at_time: float | None) -> Snapshot | None:
        with self._errors("read snapshots from"):
            for key in reversed(self._keys(folder)):
                if at_version is not None and int(key.rsplit("/", 1)[1].removesuffix(".json")) > at_version:
                    continue
                try:
                    body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                except self.client.exceptions.NoSuchKey:
                    continue  # removed by a writer keeping fewer
                snapshot = Snapshot.from_bytes(body, f"s3://{self.bucket}/{key}")
                if snapshot.fits(at_version, at_time):
                    return snapshot
        return None

    def _keys(self, folder: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
            keys += [item["Key"] for item in page.get("Contents", ()) if item["Key"].endswith(".json")]
        return sorted(keys)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """boto3's errors (a missing bucket, refused credentials, no connection) as
        `SnapshotStoreError`, with boto3's own explanation."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise SnapshotStoreError(f"cannot {what} s3://{self.bucket}/{self.prefix}: {error}") from None
