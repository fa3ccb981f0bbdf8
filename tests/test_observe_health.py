"""Health evaluation rules, each from hand-written offset sequences, then on a real engine group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.engine import Engine, SharedGroupConfig, StreamConfig
from pigeon.engine.groups.lag import PartitionLag
from pigeon.errors import InvalidConfigError
from pigeon.observe.alerts import Alert, Thresholds, check, exit_code
from pigeon.observe.health import HealthMonitor, HealthRules, Sample, Status


def lag(committed: int, head: int, partition: int = 0, in_flight: int = 0) -> PartitionLag:
    return PartitionLag(partition, head, committed, head - committed, 0, in_flight, 0)


def feed(
    samples: Sequence[tuple[int, int]], *, in_flight: int = 0, rules: HealthRules | None = None
) -> Status:
    """(committed, head) per sample, one second apart; the partition's final status."""
    monitor = HealthMonitor(rules)
    health = None
    for second, (committed, head) in enumerate(samples):
        health = monitor.observe("s", "g", [lag(committed, head, in_flight=in_flight)], now=float(second))
    assert health is not None
    return health.partitions[0].status


def test_too_few_samples_are_ok_and_incomplete() -> None:
    monitor = HealthMonitor(HealthRules(window=4, min_samples=3))
    health = monitor.observe("s", "g", [lag(0, 100)], now=0)
    assert health.status is Status.OK and not health.complete
    assert "collecting" in health.partitions[0].reason


def test_a_zero_lag_anywhere_in_the_window_is_ok() -> None:
    assert feed([(10, 10), (10, 50), (10, 90)]) is Status.OK


def test_offset_going_backwards_is_rewind() -> None:
    assert feed([(10, 50), (20, 60), (5, 60)]) is Status.REWIND


def test_a_rewind_after_catching_up_is_ok_until_the_zero_lag_leaves_the_window() -> None:
    rules = HealthRules(window=4, min_samples=3)
    caught_up_then_reset = [(50, 50), (60, 70), (5, 70), (20, 70)]
    assert feed(caught_up_then_reset, rules=rules) is Status.OK
    assert feed([*caught_up_then_reset, (30, 70)], rules=rules) is Status.REWIND


def test_no_progress_and_nothing_in_flight_is_stop() -> None:
    assert feed([(10, 50), (10, 55), (10, 60)]) is Status.STOP


def test_no_progress_while_messages_are_in_flight_is_stall() -> None:
    assert feed([(10, 50), (10, 50), (10, 50)], in_flight=5) is Status.STALL


def test_progress_while_the_lag_keeps_growing_is_warn() -> None:
    assert feed([(10, 50), (20, 70), (30, 95), (40, 130)]) is Status.WARN


def test_progress_with_the_lag_coming_down_is_ok() -> None:
    assert feed([(10, 100), (40, 120), (80, 130), (120, 140)]) is Status.OK


def test_a_flat_lag_with_progress_is_ok() -> None:
    # Keeping pace, never caught up, not falling behind. Burrow would warn on a flat lag;
    # pigeon wants it to grow (docs/operations.md).
    assert feed([(10, 60), (20, 70), (30, 80)]) is Status.OK


def test_the_window_slides() -> None:
    rules = HealthRules(window=3, min_samples=3)
    # A zero lag long ago no longer makes it OK once it left the window.
    assert feed([(10, 10), (10, 20), (10, 30), (10, 40)], rules=rules) is Status.STOP


def test_group_status_takes_the_worst_partition() -> None:
    monitor = HealthMonitor()
    health = None
    for second, (a, b) in enumerate([((10, 10), (10, 50)), ((20, 20), (10, 60)), ((30, 30), (10, 70))]):
        health = monitor.observe("s", "g", [lag(*a, partition=0), lag(*b, partition=1)], now=second)
    assert health is not None
    assert health.partition(0).status is Status.OK and health.partition(1).status is Status.STOP
    assert health.status is Status.ERR
    warn_only = HealthMonitor()
    for second, (committed, head) in enumerate([(10, 50), (20, 70), (30, 95)]):
        health = warn_only.observe("s", "g", [lag(committed, head)], now=second)
    assert health.status is Status.WARN


@pytest.mark.parametrize(
    ("bad", "in_flight", "expected"),
    [
        ([(10, 50), (20, 60), (5, 60)], 0, Status.REWIND),
        ([(10, 50), (10, 50), (10, 50)], 2, Status.STALL),
    ],
)
def test_stall_and_rewind_make_the_group_err(
    bad: list[tuple[int, int]], in_flight: int, expected: Status
) -> None:
    monitor = HealthMonitor()
    health = None
    for second, (committed, head) in enumerate(bad):
        healthy = lag(second * 10, second * 10, partition=0)
        warn = lag(second * 10, 50 + second * 25, partition=2)
        sick = lag(committed, head, partition=1, in_flight=in_flight)
        health = monitor.observe("s", "g", [healthy, sick, warn], now=second)
    assert health is not None
    assert [p.status for p in health.partitions] == [Status.OK, expected, Status.WARN]
    assert health.status is Status.ERR


def test_complete_once_every_window_is_full_and_forget_drops_the_group() -> None:
    monitor = HealthMonitor(HealthRules(window=3, min_samples=2), clock=lambda: 7.0)
    states = []
    for committed in (1, 2, 3):
        health = monitor.observe("s", "g", [lag(committed, 10)])
        states.append((health.complete, health.partitions[0].status))
    assert states == [(False, Status.OK), (False, Status.OK), (True, Status.OK)]
    monitor.forget("s", "g")
    health = monitor.evaluate("s", "g")
    assert health.partitions == () and not health.complete and health.status is Status.OK


def test_samples_and_alerts_build_as_the_contract_says() -> None:
    assert Sample(1.0, 10, 15).lag == 5 and not Sample(1.0, 10, 15).active
    assert Alert("s", "g", None, "lag", "too far").severity == "error"


def test_rules_are_validated() -> None:
    with pytest.raises(InvalidConfigError):
        HealthRules(window=1)
    with pytest.raises(InvalidConfigError):
        HealthRules(window=3, min_samples=5)


@given(st.lists(st.integers(min_value=0, max_value=50), min_size=3, max_size=12))
def test_a_consumer_that_catches_up_is_never_in_error(steps: list[int]) -> None:
    committed, head, samples = 0, 0, []
    for step in steps:
        head += step
        samples.append((committed, head))
        committed = head  # it processes everything between samples
    samples.append((committed, head))
    assert feed(samples) is Status.OK


def test_thresholds_and_exit_codes() -> None:
    monitor = HealthMonitor()
    health = None
    for second in range(3):
        health = monitor.observe("s", "g", [lag(10 * second, 10 * second + 500)], now=second)
    assert health is not None and health.status is Status.OK
    assert exit_code(check(health, Thresholds())) == 0
    over = check(health, Thresholds(max_lag=100))
    assert [a.kind for a in over] == ["lag"] and exit_code(over) == 2
    unknown = check(health, Thresholds(max_time_behind_s=60), {0: None})
    assert unknown[0].kind == "time_behind" and "unknown" in unknown[0].message and exit_code(unknown) == 1
    assert check(health, Thresholds(max_time_behind_s=60), {0: 5.0}) == []
    assert exit_code(check(health, Thresholds(max_time_behind_s=60), {0: 61.0})) == 2
    with pytest.raises(InvalidConfigError):
        Thresholds(max_lag=-1)


async def test_a_real_group_goes_ok_stop_then_ok_again(tmp_path: Path) -> None:
    engine = await Engine.open(tmp_path / "data")
    try:
        await engine.create_stream(StreamConfig("orders", ("orders.>",)))
        group = await engine.shared_group("orders", SharedGroupConfig("billing"))
        member = group.member()
        monitor = HealthMonitor(HealthRules(window=3, min_samples=3))
        now = 0.0

        async def sample() -> Status:
            nonlocal now
            now += 1
            return monitor.observe("orders", "billing", engine.group_lag("orders", "billing"), now=now).status

        for i in range(3):  # consuming everything as it comes
            await engine.publish("orders.new", b"%d" % i)
            for delivery in await member.fetch(10, 0.1):
                await delivery.ack()
            assert await sample() is Status.OK
        for i in range(3):  # the consumer stops; orders keep coming
            await engine.publish("orders.new", b"late %d" % i)
            status = await sample()
        assert status is Status.ERR
        assert monitor.evaluate("orders", "billing").partition(0).status is Status.STOP
        held = await member.fetch(10, 0.1)  # it takes them but does not finish
        assert len(held) == 3
        for _ in range(3):
            status = await sample()
        assert monitor.evaluate("orders", "billing").partition(0).status is Status.STALL
        for delivery in held:
            await delivery.ack()
        assert await sample() is Status.OK
    finally:
        await engine.close()
