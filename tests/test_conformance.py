"""Every transport passes the conformance suite (`pytest -m conformance`)."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest

from pigeon.testing.conformance import TransportConformance
from pigeon.testing.services import require_service
from pigeon.transport import connect
from pigeon.transport.base import Transport

pytestmark = pytest.mark.conformance


class TestMemory(TransportConformance):
    url = "memory://"


class TestEmbedded(TransportConformance):
    restartable = True

    async def make_transport(self) -> Transport:
        if not hasattr(self, "folder"):
            self.folder = tempfile.mkdtemp(prefix="pigeon-conformance-")
        return await connect(f"file://{self.folder}")

    async def restart_broker(self, transport: Transport) -> Transport:
        # The embedded broker lives in the transport: restarting it is closing and reopening.
        await transport.close()
        reopened = await self.make_transport()
        transport.close = reopened.close  # type: ignore[method-assign]  # the fixture closes it
        return reopened


class ServiceTransport(TransportConformance):
    service = ""

    async def make_transport(self) -> Transport:
        url: Any = require_service(self.service)
        return await connect(url)


class TestNats(ServiceTransport):
    service = "nats"


class TestRedis(ServiceTransport):
    service = "redis"


class TestRabbitMQ(ServiceTransport):
    service = "rabbitmq"


class TestPostgres(ServiceTransport):
    service = "postgres"
