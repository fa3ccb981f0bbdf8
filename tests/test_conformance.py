"""Every transport passes the conformance suite (`pytest -m conformance`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from pigeon.testing.conformance import TransportConformance
from pigeon.testing.services import require_service
from pigeon.transport import connect
from pigeon.transport.base import Transport
from pigeon.transport.nats._pigeon import PigeonServeTransport
from serve_process import Served

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


class TestPigeonServe(TransportConformance):
    """``nats://`` against a real `pigeon serve` process: the transport finds `$PIGEON.API` and
    uses the engine's own partitions, groups and dead letters. Restarting is kill -9, then
    starting it again on the same folder and port."""

    restartable = True
    served: ClassVar[Served]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def pigeon_serve(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        cls.served = Served(tmp_path_factory.mktemp("serve") / "data").wait_listening()
        yield
        cls.served.kill()

    async def make_transport(self) -> Transport:
        transport = await connect(type(self).served.nats_url)
        assert isinstance(transport, PigeonServeTransport), "the transport did not find $PIGEON.API"
        return transport

    async def restart_broker(self, transport: Transport) -> Transport:
        cls = type(self)
        cls.served.kill()
        cls.served = Served(cls.served.data, port=cls.served.port).wait_listening()
        return transport  # nats-py reconnects to the same address
