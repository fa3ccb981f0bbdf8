"""Prometheus metrics for consumer lag, under the names existing Kafka dashboards read.

`LagCollector` is a prometheus-client collector fed with lag snapshots (`update`), from any
transport (`pigeon exporter`) or from the engine (`pigeon serve`, whose sampler also feeds the
health monitor). On a scrape it reports, per group and partition, the metrics of
kafka_exporter, so Grafana dashboards built for Kafka work unchanged:

- ``kafka_consumergroup_lag{consumergroup,topic,partition}``: head - committed;
- ``kafka_consumergroup_current_offset{consumergroup,topic,partition}``: the group's committed
  offset (the next one it has not finished);
- ``kafka_topic_partition_current_offset{topic,partition}``: the partition's head (the next
  offset it will write);
- ``kafka_consumergroup_lag_sum{consumergroup,topic}``;

and pigeon's own: ``pigeon_group_health_status{consumergroup,topic}`` (the `Status` value),
``pigeon_group_messages_in_flight`` and ``pigeon_group_messages_waiting`` per partition,
``pigeon_group_messages_committed_total`` (its rate is the consume rate), and
``pigeon_dead_letters{consumergroup,topic}`` where the depth is known. A group whose lag could
not be read is absent, never reported as zero.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.groups.lag import PartitionLag
from .health import Status

__all__ = ["LagCollector"]


@dataclass(frozen=True)
class _Snapshot:
    lags: tuple[PartitionLag, ...]
    health: Status | None
    dead_letters: int | None


class LagCollector(Collector):
    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], _Snapshot] = {}

    def update(
        self,
        stream: str,
        group: str,
        lags: Sequence[PartitionLag],
        *,
        health: Status | None = None,
        dead_letters: int | None = None,
    ) -> None:
        self._groups[(stream, group)] = _Snapshot(tuple(lags), health, dead_letters)

    def forget(self, stream: str, group: str) -> None:
        """The group is gone or its lag cannot be read now: stop reporting it."""
        self._groups.pop((stream, group), None)

    def retain(self, keep: set[tuple[str, str]]) -> None:
        for key in [k for k in self._groups if k not in keep]:
            del self._groups[key]

    def collect(self) -> Iterator[Metric]:
        group_labels = ["consumergroup", "topic", "partition"]
        lag = GaugeMetricFamily(
            "kafka_consumergroup_lag",
            "Current approximate lag of a consumer group at topic/partition",
            labels=group_labels,
        )
        current = GaugeMetricFamily(
            "kafka_consumergroup_current_offset",
            "Current offset of a consumer group at topic/partition",
            labels=group_labels,
        )
        head = GaugeMetricFamily(
            "kafka_topic_partition_current_offset",
            "Current offset of a broker at topic/partition",
            labels=["topic", "partition"],
        )
        lag_sum = GaugeMetricFamily(
            "kafka_consumergroup_lag_sum",
            "Current approximate lag of a consumer group at topic for all partitions",
            labels=["consumergroup", "topic"],
        )
        in_flight = GaugeMetricFamily(
            "pigeon_group_messages_in_flight",
            "Messages leased to members and not settled",
            labels=group_labels,
        )
        waiting = GaugeMetricFamily(
            "pigeon_group_messages_waiting", "Failed messages waiting for redelivery", labels=group_labels
        )
        health = GaugeMetricFamily(
            "pigeon_group_health_status",
            "Health of the group: 0 OK, 1 WARN, 2 ERR, 3 STOP, 4 STALL, 5 REWIND",
            labels=["consumergroup", "topic"],
        )
        letters = GaugeMetricFamily(
            "pigeon_dead_letters",
            "Messages in the group's dead-letter stream",
            labels=["consumergroup", "topic"],
        )
        committed = CounterMetricFamily(
            "pigeon_group_messages_committed",
            "Offsets the group has finished, over all partitions (rate() is the consume rate)",
            labels=["consumergroup", "topic"],
        )
        heads: dict[tuple[str, int], int] = {}
        for (stream, group), snapshot in sorted(self._groups.items()):
            for p in snapshot.lags:
                labels = [group, stream, str(p.partition)]
                lag.add_metric(labels, p.lag)
                current.add_metric(labels, p.committed)
                in_flight.add_metric(labels, p.in_flight)
                waiting.add_metric(labels, p.waiting)
                heads[(stream, p.partition)] = max(heads.get((stream, p.partition), 0), p.head)
            lag_sum.add_metric([group, stream], sum(p.lag for p in snapshot.lags))
            committed.add_metric([group, stream], sum(p.committed for p in snapshot.lags))
            if snapshot.health is not None:
                health.add_metric([group, stream], int(snapshot.health))
            if snapshot.dead_letters is not None:
                letters.add_metric([group, stream], snapshot.dead_letters)
        for (stream, partition), value in sorted(heads.items()):
            head.add_metric([stream, str(partition)], value)
        yield from (lag, current, head, lag_sum, committed, in_flight, waiting, health, letters)
