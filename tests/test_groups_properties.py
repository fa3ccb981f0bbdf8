"""Property test of the shared-group lease / redelivery state machine.

Hypothesis drives random sequences of publish / fetch / ack / nack / term / let the leases
expire / close and reopen the engine against a real engine, and a model checks after every
step that

* an acked or dead-lettered message is never delivered again,
* a message is never leased to two holders at once,
* delivery counts only grow (also across restarts),
* the group's lag is consistent: pending + in_flight + waiting == unfinished messages, and
  in_flight is exactly the set of live leases,
* the dead-letter stream holds exactly the termed messages and those that failed
  ``max_deliver`` times, each once;

and, draining the group at the end, that every published message was either acked or
dead-lettered.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from pigeon.engine import Delivery, Engine, SharedGroupConfig, StreamConfig
from pigeon.errors import DeliveryNotOwnedError
from pigeon.message import Headers

STREAM = "props"
SUBJECT = "props.msg"
DLQ = f"{STREAM}-g-dlq"
ACK_WAIT = 0.3
MAX_DELIVER = 3
CONFIG = SharedGroupConfig("g", ack_wait_s=ACK_WAIT, max_deliver=MAX_DELIVER)

Key = tuple[int, int]  # (partition, offset)


class SharedLeases(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.path = Path(tempfile.mkdtemp(prefix="pigeon-props-"))
        self.published: dict[Key, bytes] = {}
        self.held: dict[Key, Delivery] = {}  # the latest delivery of each message we hold
        self.acked: set[Key] = set()
        self.expect_dead: set[Key] = set()  # termed, or failed for the max_deliver-th time
        # delivered max_deliver times when the engine closed, outcome unknown: the next fetch
        # buries them (dead letter) instead of delivering them again
        self.bury_on_fetch: set[Key] = set()
        self.counts: dict[Key, int] = {}
        self.next_payload = 0
        self.engine: Engine = self.run(self._open(create=True))

    # -- plumbing ------------------------------------------------------------------------------

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _open(self, *, create: bool = False) -> Engine:
        engine = await Engine.open(self.path)
        if create:
            await engine.create_stream(StreamConfig(STREAM, (f"{STREAM}.>",), partitions=2))
        self.group = await engine.shared_group(STREAM, CONFIG)
        self.members = [self.group.member("m0"), self.group.member("m1")]
        return engine

    def _dead_letters(self) -> list[Key]:
        if DLQ not in self.engine.streams():
            return []
        return [
            (int(m.headers[Headers.ORIGINAL_PARTITION]), int(m.headers[Headers.ORIGINAL_OFFSET]))
            for m in self.engine.fetch(DLQ, 0, 0, 10_000)
        ]

    def _reconcile(self) -> None:
        """Forget held deliveries whose lease expired; those at max_deliver become dead letters."""
        for key, d in list(self.held.items()):
            if d.cancelled.is_set() and not d.settled:
                del self.held[key]
                if d.delivery_count >= MAX_DELIVER:
                    self.expect_dead.add(key)

    async def _quiesce(self) -> None:
        """Let dead-lettering of expired leases (done in a background task) finish."""
        self._reconcile()
        deadline = time.monotonic() + 3
        while not self.expect_dead <= set(self._dead_letters()):
            assert time.monotonic() < deadline, "an expired message never reached the dead letters"
            await asyncio.sleep(0.01)
            self._reconcile()
        await asyncio.sleep(0.01)

    def _saw(self, deliveries: list[Delivery]) -> None:
        dead = set(self._dead_letters())
        for d in deliveries:
            key = (d.partition, d.offset)
            assert key in self.published, f"{d} was never published"
            assert d.message.payload == self.published[key]
            assert key not in self.acked, f"{d}: an acked message was delivered again"
            assert key not in dead and key not in self.expect_dead, f"{d}: a dead letter was delivered again"
            old = self.held.get(key)
            assert old is None or old.settled or old.cancelled.is_set(), (
                f"{d}: leased while the previous delivery still holds the lease"
            )
            if old is not None and old.delivery_count >= MAX_DELIVER:
                raise AssertionError(f"{d}: redelivered after its {MAX_DELIVER}th delivery expired")
            assert d.delivery_count > self.counts.get(key, 0), (
                f"{d}: delivery count did not grow (was {self.counts.get(key)})"
            )
            self.counts[key] = d.delivery_count
            self.held[key] = d

    def _check(self) -> None:
        dead_list = self._dead_letters()
        dead = set(dead_list)
        assert len(dead_list) == len(dead), f"a message was dead-lettered twice: {dead_list}"
        assert dead == self.expect_dead, f"dead letters {dead} != expected {self.expect_dead}"
        assert not (dead & self.acked)
        lags = self.engine.group_lag(STREAM, "g")
        for lag in lags:
            assert 0 <= lag.committed <= lag.head and lag.lag == lag.head - lag.committed, lag
            assert min(lag.pending, lag.in_flight, lag.waiting) >= 0, lag
        live = [d for d in self.held.values() if not d.settled and not d.cancelled.is_set()]
        assert sum(lag.in_flight for lag in lags) == len(live), (lags, live)
        unfinished = len(self.published) - len(self.acked) - len(dead)
        assert sum(lag.pending + lag.in_flight + lag.waiting for lag in lags) == unfinished, (
            lags,
            unfinished,
        )
        for p, lag in enumerate(lags):
            finished_below = [o for (q, o) in self.acked | dead if q == p]
            unfinished_here = [o for (q, o) in self.published if q == p and o not in finished_below]
            assert lag.committed == min(unfinished_here, default=lag.head), (lag, unfinished_here)

    def _pick(self, data) -> tuple[Key, Delivery]:
        key = data.draw(st.sampled_from(sorted(self.held)))
        return key, self.held.pop(key)

    async def _settle(self, key: Key, d: Delivery, how: str, delay: float | None = None) -> bool:
        try:
            if how == "ack":
                await d.ack()
            elif how == "nack":
                await d.nack(delay, error=RuntimeError("nacked"))
            else:
                await d.term("termed")
        except DeliveryNotOwnedError:
            assert d.cancelled.is_set(), f"{d}: not owned, but its lease was not cancelled"
            self.held[key] = d  # let _reconcile account for the expiry
            return False
        return True

    # -- rules ---------------------------------------------------------------------------------

    @rule(n=st.integers(1, 3), keyed=st.booleans())
    def publish(self, n: int, keyed: bool) -> None:
        async def go() -> None:
            for _ in range(n):
                payload = str(self.next_payload).encode()
                key = f"k{self.next_payload % 3}" if keyed else None
                self.next_payload += 1
                ack = await self.engine.publish(SUBJECT, payload, key=key)
                self.published[(ack.partition, ack.offset)] = payload
            await self._quiesce()
            self._check()

        self.run(go())

    @rule(who=st.integers(0, 1), max_messages=st.integers(1, 4))
    def fetch(self, who: int, max_messages: int) -> None:
        async def go() -> None:
            self._reconcile()
            deliveries = await self.members[who].fetch(max_messages, 0.02)
            self.expect_dead |= self.bury_on_fetch
            self.bury_on_fetch.clear()
            self._reconcile()
            self._saw(deliveries)
            await self._quiesce()
            self._check()

        self.run(go())

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data) -> None:
        key, d = self._pick(data)

        async def go() -> None:
            if await self._settle(key, d, "ack"):
                self.acked.add(key)
            await self._quiesce()
            self._check()

        self.run(go())

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delay=st.sampled_from([None, 0.0, 0.05]))
    def nack(self, data, delay: float | None) -> None:
        key, d = self._pick(data)

        async def go() -> None:
            if await self._settle(key, d, "nack", delay) and d.delivery_count >= MAX_DELIVER:
                self.expect_dead.add(key)
            await self._quiesce()
            self._check()

        self.run(go())

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def term(self, data) -> None:
        key, d = self._pick(data)

        async def go() -> None:
            if await self._settle(key, d, "term"):
                self.expect_dead.add(key)
            await self._quiesce()
            self._check()

        self.run(go())

    @precondition(lambda self: any(not d.cancelled.is_set() for d in self.held.values()))
    @rule()
    def let_leases_expire(self) -> None:
        async def go() -> None:
            live = [d for d in self.held.values() if not d.cancelled.is_set()]
            await asyncio.sleep(ACK_WAIT + 0.12)
            for d in live:
                assert d.cancelled.is_set(), f"{d}: lease still live after ack_wait"
            await self._quiesce()
            assert not self.held
            self._check()

        self.run(go())

    @rule()
    def close_and_reopen(self) -> None:
        async def go() -> None:
            await self._quiesce()
            await self.engine.close()
            for key, d in self.held.items():
                if not d.settled and not d.cancelled.is_set() and d.delivery_count >= MAX_DELIVER:
                    self.bury_on_fetch.add(key)
            self.held.clear()  # leases live in memory only: they end with the engine
            self.engine = await self._open()
            await self._quiesce()
            self._check()

        self.run(go())

    # -- the end -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        for key, d in list(self.held.items()):
            if not d.cancelled.is_set() and await self._settle(key, d, "ack"):
                self.acked.add(key)
                del self.held[key]
        drainer = self.group.member("drainer")
        deadline = time.monotonic() + 10
        while set(self.published) - self.acked - set(self._dead_letters()):
            assert time.monotonic() < deadline, "the group could not be drained"
            deliveries = await drainer.fetch(100, 0.1)
            self.expect_dead |= self.bury_on_fetch
            self.bury_on_fetch.clear()
            self._reconcile()
            self._saw(deliveries)
            for d in deliveries:
                key = (d.partition, d.offset)
                if await self._settle(key, d, "ack"):
                    self.acked.add(key)
                    del self.held[key]
            await self._quiesce()
        await self._quiesce()
        self._check()
        dead = set(self._dead_letters())
        assert self.acked | dead == set(self.published)
        assert not (self.acked & dead)
        assert all(lag.lag == 0 for lag in self.engine.group_lag(STREAM, "g"))
        assert await drainer.fetch(10, 0.05) == []

    def teardown(self) -> None:
        try:
            self.run(self._drain())
        finally:
            try:
                self.run(self.engine.close())
            finally:
                self.loop.close()
                shutil.rmtree(self.path, ignore_errors=True)


def test_shared_group_lease_state_machine() -> None:
    run_state_machine_as_test(
        SharedLeases,
        settings=settings(
            max_examples=30,
            stateful_step_count=14,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
