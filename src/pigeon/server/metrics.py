"""What ``pigeon serve`` knows about itself, for ``/metrics`` and the admin API.

`Observer` samples every group's lag on a timer: the samples feed the health monitor
(`pigeon.observe.health`) and the Kafka-named lag metrics (`pigeon.observe.metrics`). Server
counters (connections, slow consumers, stream sizes) are read at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import Engine
from ..engine.groups import dead_letter_stream
from ..errors import PigeonError
from ..observe.health import GroupHealth, HealthMonitor
from ..observe.metrics import LagCollector
from .nats import NatsServer

__all__ = ["CONTENT_TYPE_LATEST", "Observer"]

log = logging.getLogger("pigeon.server.metrics")


class Observer:
    """``start()`` the sampler; ``exposition()`` is the text a Prometheus scrape gets."""

    def __init__(self, engine: Engine, nats: NatsServer, interval_s: float = 5.0) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.monitor = HealthMonitor()
        self.lag = LagCollector()
        self.registry = CollectorRegistry()
        self.registry.register(self.lag)
        self.registry.register(_ServerCollector(engine, nats))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:  # a failed round must not end sampling for good
                log.exception("sampling group lag failed")

    def sample(self) -> None:
        """Observe every group of every stream once."""
        present: set[tuple[str, str]] = set()
        for stream in self.engine.streams():
            config = self.engine.stream_info(stream).config
            for group in self.engine.groups(stream):
                try:
                    lags = self.engine.group_lag(stream, group)
                except PigeonError:
                    continue  # deleted meanwhile
                health = self.monitor.observe(stream, group, lags)
                letters = dead_letter_stream(config, group).name
                depth = self.engine.stream_info(letters).messages if letters in self.engine.streams() else 0
                self.lag.update(stream, group, lags, health=health.status, dead_letters=depth)
                present.add((stream, group))
        self.lag.retain(present)
        for key in list(self.monitor.groups()):
            if key not in present:
                self.monitor.forget(*key)

    def health(self, stream: str, group: str) -> GroupHealth:
        return self.monitor.evaluate(stream, group)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ServerCollector(Collector):
    def __init__(self, engine: Engine, nats: NatsServer) -> None:
        self.engine = engine
        self.nats = nats

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily("pigeon_server_connections", "NATS client connections open")
        connections.add_metric([], self.nats.connection_count)
        slow = CounterMetricFamily(
            "pigeon_server_slow_consumers", "Client connections cut off for not reading fast enough"
        )
        slow.add_metric([], self.nats.slow_consumers)
        published = CounterMetricFamily(
            "pigeon_stream_messages_published",
            "Messages ever stored in the stream (offsets only grow: rate() is the publish rate)",
            labels=["stream"],
        )
        messages = GaugeMetricFamily(
            "pigeon_stream_messages", "Messages stored in the stream", labels=["stream"]
        )
        size = GaugeMetricFamily("pigeon_stream_bytes", "Bytes stored in the stream", labels=["stream"])
        for stream in self.engine.streams():
            info = self.engine.stream_info(stream)
            published.add_metric([stream], sum(p.next_offset for p in info.partitions))
            messages.add_metric([stream], info.messages)
            size.add_metric([stream], info.bytes)
        yield from (connections, slow, published, messages, size)
