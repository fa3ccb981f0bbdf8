"""`/metrics` on pigeon serve, scraped over HTTP and parsed with prometheus-client's parser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pigeon.engine.groups.lag import PartitionLag
from pigeon.observe.health import Status
from pigeon.observe.metrics import LagCollector
from pigeon.server.serve import Running, ServeOptions, running
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, StreamSpec


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    options = ServeOptions(data=tmp_path / "data", port=0, http_port=0, sample_interval_s=0.05)
    async with running(options) as parts:
        yield parts


async def test_lag_metrics_match_the_engine(served: Running) -> None:
    transport = await connect(served.nats.url)
    try:
        await transport.create_stream(StreamSpec("orders", ("orders.>",), partitions=2))
        for i in range(40):
            await transport.publish("orders.new", b"%d" % i, key=f"customer-{i % 7}")
        consumer = await transport.consumer("orders", ConsumerSpec("billing", dead_letter=True))
        taken = await consumer.fetch(15, 2)
        for received in taken[:-1]:
            await received.ack()
        await taken[-1].term("refused")
        engine_lags = served.engine.group_lag("orders", "billing")
        await asyncio.sleep(0.3)  # a few sampling rounds
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"{served.http.url}/metrics")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        found = samples(reply.text)
        heads = {p.partition: p.head for p in engine_lags}
        for p in engine_lags:
            labels = {"consumergroup": "billing", "topic": "orders", "partition": str(p.partition)}
            assert value(found, "kafka_consumergroup_lag", **labels) == p.lag
            assert value(found, "kafka_consumergroup_current_offset", **labels) == p.committed
            assert (
                value(
                    found, "kafka_topic_partition_current_offset", topic="orders", partition=str(p.partition)
                )
                == heads[p.partition]
            )
        assert sum(heads.values()) == 40
        lag_sum = value(found, "kafka_consumergroup_lag_sum", consumergroup="billing", topic="orders")
        assert lag_sum == sum(p.lag for p in engine_lags) == 40 - 15
        assert value(found, "pigeon_dead_letters", consumergroup="billing", topic="orders") == 1
        assert value(found, "pigeon_group_health_status", consumergroup="billing", topic="orders") in {
            s.value for s in Status
        }
        assert value(found, "pigeon_stream_messages", stream="orders") == 40
        assert value(found, "pigeon_stream_messages_published_total", stream="orders") == 40
        committed = sum(p.committed for p in engine_lags)
        labels = {"consumergroup": "billing", "topic": "orders"}
        assert value(found, "pigeon_group_messages_committed_total", **labels) == committed
        assert value(found, "pigeon_server_connections") >= 1
        assert value(found, "pigeon_server_slow_consumers_total") == 0
        await consumer.close()
        await transport.delete_stream("orders")
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as http:
            gone = samples((await http.get(f"{served.http.url}/metrics")).text)
        assert not any(name == "kafka_consumergroup_lag" for name, _ in gone)  # absent, not zero
    finally:
        await transport.close()


def test_a_group_without_a_reading_is_absent_rather_than_zero() -> None:
    collector = LagCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update("s", "g", [PartitionLag(0, 10, 4, 6, 6, 0, 0)], health=Status.WARN, dead_letters=None)
    found = samples(generate_latest(registry).decode())
    assert value(found, "kafka_consumergroup_lag", consumergroup="g", topic="s", partition="0") == 6
    assert value(found, "pigeon_group_health_status", consumergroup="g", topic="s") == 1
    assert not any(name == "pigeon_dead_letters" for name, _ in found)  # unknown depth
    collector.forget("s", "g")
    assert not any(
        name.startswith("kafka_consumergroup") for name, _ in samples(generate_latest(registry).decode())
    )
