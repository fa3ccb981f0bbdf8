"""The automatic redrive policy: dead letters go back after a while, poison stays parked."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app_helpers import fast_retry, until
from pigeon.app import App, Context, RedrivePolicy, Reject
from pigeon.errors import InvalidConfigError, InvalidHandlerError
from pigeon.message import Headers
from pigeon.patterns.deadletters import DeadLetters


async def test_a_temporary_failure_is_redriven_and_poison_is_parked(
    any_transport: Any, make_stream: Any
) -> None:
    stream, prefix = await make_stream()
    make_stream.created.append(f"{stream}-billing-dlq")
    app = App(any_transport)
    calls: list[tuple[str, str]] = []
    policy = RedrivePolicy(after_s=0.2, max_redrives=2, check_every_s=0.1)

    @app.subscriber(stream=stream, group="billing", retry=fast_retry(1), redrive=policy)
    async def bill(text: str, ctx: Context) -> None:
        redrives = ctx.message.headers.get(Headers.REDRIVE_COUNT, "0")
        calls.append((text, redrives))
        if text == "poison" or (text == "flaky" and redrives == "0"):
            raise Reject("payment service down")

    async with app:
        await app.publish(f"{prefix}.o", "flaky")
        await app.publish(f"{prefix}.o", "poison")
        assert await until(lambda: ("poison", "2") in calls and ("flaky", "1") in calls, timeout=20)
        await asyncio.sleep(0.5)  # more passes of the policy: the parked letter stays
    # With the app (and its redrive passes, which hold letters while they look) stopped:
    box = DeadLetters(any_transport, stream, "billing")
    for _ in range(50):  # the last dead letter may still be on its way
        if letters := await box.list():
            break
        await asyncio.sleep(0.1)
    await box.close()
    assert [c for c in calls if c[0] == "flaky"] == [("flaky", "0"), ("flaky", "1")]
    assert [c for c in calls if c[0] == "poison"] == [("poison", "0"), ("poison", "1"), ("poison", "2")]
    (parked,) = letters
    assert parked.message.payload == b"poison" and parked.redrive_count == 2


def test_policies_are_checked() -> None:
    with pytest.raises(InvalidConfigError):
        RedrivePolicy(after_s=-1)
    with pytest.raises(InvalidConfigError):
        RedrivePolicy(max_redrives=0)
    with pytest.raises(InvalidConfigError):
        RedrivePolicy(check_every_s=0)
    with pytest.raises(InvalidHandlerError):
        App("memory://").subscriber("a.b", redrive=RedrivePolicy())
