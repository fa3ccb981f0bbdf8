"""The Metrics middleware on a real app: outcomes, durations, retries and redeliveries counted."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from app_helpers import dead_letters, fast_retry, until
from pigeon.app import App, Reject
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
    async def work(job: str) -> None:
        seen.append(job)
        if job == "bad":
            raise Reject("refused")
        if job == "flaky" and seen.count("flaky") < 2:
            raise ConnectionError("try again")

    def count(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"subject": "jobs.new", "group": "workers", **labels}) or 0.0

    async with app:
        for job in ("a", "b", "bad", "flaky"):
            await app.publish("jobs.new", job)
        assert await until(lambda: count("pigeon_messages_consumed_total", outcome="ok") == 3, timeout=10)
        assert len(await dead_letters(transport, "jobs", "workers", 1)) == 1
    assert count("pigeon_messages_consumed_total", outcome="reject") == 1
    assert count("pigeon_messages_consumed_total", outcome="error") == 1
    assert count("pigeon_handler_duration_seconds_count") == 5  # every call timed
    assert count("pigeon_redeliveries_total") == 1  # the flaky job came back from the broker
    assert count("pigeon_retries_total") == 1
    await transport.close()
