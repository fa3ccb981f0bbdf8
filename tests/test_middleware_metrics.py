"""The Metrics middleware on a real app: outcomes, durations, retries, redeliveries and publishes."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Context, Nack, Reject
from pigeon.app.middleware import Metrics
from pigeon.transport import connect
from pigeon.transport.base import StreamSpec


async def test_counts_every_outcome(tmp_path: Path) -> None:
    transport = await connect(f"file://{tmp_path / 'broker'}")
    await transport.create_stream(StreamSpec("jobs", ("jobs.>",)))
    registry = CollectorRegistry()
    app = App(transport, middleware=[Metrics(registry)])
    seen: list[str] = []

    @app.subscriber("jobs.>", stream="jobs", group="workers", retry=fast_retry(3, strategy="broker"))
    async def work(job: str, ctx: Context) -> None:
        seen.append(job)
        if job == "a":
            await ctx.publish("jobs.audit", "audit")
        if job == "bad":
            raise Reject("refused")
        if job == "flaky" and seen.count("flaky") < 2:
            raise ConnectionError("try again")
        if job == "later" and seen.count("later") < 2:
            raise Nack(delay=0.05)
        if job == "doomed":
            raise ConnectionError("never works")

    pinged: list[str] = []

    @app.subscriber("pings.>", retry=fast_retry(1))
    async def ping(text: str) -> None:
        pinged.append(text)
        raise Reject("not now")  # a core subscription has no dead letters: dropped

    def count(name: str, subject: str = "jobs.new", group: str = "workers", **labels: str) -> float:
        return registry.get_sample_value(name, {"subject": subject, "group": group, **labels}) or 0.0

    async with app:
        for job in ("a", "b", "bad", "flaky", "later", "doomed"):
            await app.publish("jobs.new", job)
        await app.publish("pings.x", "hello")
        assert await until(lambda: count("pigeon_messages_consumed_total", outcome="acked") == 4, timeout=10)
        assert len(await dead_letters(transport, "jobs", "workers", 2)) == 2
        assert await until(lambda: pinged == ["hello"])
    assert count("pigeon_messages_consumed_total", outcome="dead_lettered") == 2  # bad, doomed
    assert count("pigeon_messages_consumed_total", outcome="retried") == 3  # flaky once, doomed twice
    assert count("pigeon_messages_consumed_total", outcome="nacked") == 1
    assert count("pigeon_messages_consumed_total", "jobs.audit", outcome="acked") == 1
    assert count("pigeon_messages_consumed_total", "pings.x", "", outcome="dropped") == 1
    assert count("pigeon_handler_duration_seconds_count") == 10  # every call on jobs.new timed
    assert count("pigeon_retries_total") == 4  # flaky, later, doomed twice
    assert count("pigeon_redeliveries_total") == 4  # the broker delivered those again
    published = {
        s.labels["subject"]: s.value
        for family in registry.collect()
        if family.name == "pigeon_published"
        for s in family.samples
        if s.name == "pigeon_published_total"
    }
    assert published == {"jobs.new": 6, "pings.x": 1, "jobs.audit": 1}
    await transport.close()
