"""``pigeon consume STREAM --group G``: join a consumer group, print and acknowledge its messages."""

from __future__ import annotations

import asyncio
import enum
from typing import Annotated

import typer

from ..engine.config import StartAt
from ..transport.base import ConsumerSpec
from ._common import DEFAULT_URL, JsonOption, UrlOption, opened, parse_start, run
from ._show import console, message_dict, print_json, render

__all__ = ["consume"]

_FETCH = 100


class Kind(enum.StrEnum):
    ordered = "ordered"
    shared = "shared"


def consume(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Option(help="The consumer group to join (created if new).")],
    kind: Annotated[
        Kind, typer.Option(help="ordered: partitions in order, one member each; shared: any member.")
    ] = Kind.shared,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many messages.")] = None,
    no_ack: Annotated[
        bool, typer.Option("--no-ack", help="Do not acknowledge: the group gets the messages again.")
    ] = False,
    start: Annotated[
        StartAt | None,
        typer.Option(
            parser=parse_start,
            metavar="WHERE",
            help="Where a new group starts: earliest, latest, offset:N or time:ISO [earliest].",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Stop when no message arrives for this many seconds.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Print each message the group hands this member, and acknowledge it."""
    run("consume", _consume(url, stream, group, kind, start, count, no_ack, timeout, as_json), interrupted=0)


async def _consume(
    url: str,
    stream: str,
    group: str,
    kind: Kind,
    start: StartAt | None,
    count: int | None,
    no_ack: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    spec = ConsumerSpec(group, kind=kind.value, start=start or StartAt.earliest())
    out = console()
    loop = asyncio.get_running_loop()
    async with opened(url) as transport:
        consumer = await transport.consumer(stream, spec)
        try:
            console(stderr=True).print(f"consuming {stream} in {kind.value} group {group!r} (Ctrl-C to stop)")
            received = 0
            idle_since = loop.time()
            while count is None or received < count:
                want = _FETCH if count is None else min(_FETCH, count - received)
                batch = await consumer.fetch(want, 1.0 if timeout is None else min(1.0, timeout))
                if not batch:
                    if timeout is not None and loop.time() - idle_since >= timeout:
                        if count is None:
                            return
                        raise TimeoutError(
                            f"{received} of {count} messages; none came in the last {timeout} s"
                        )
                    continue
                idle_since = loop.time()
                for delivery in batch:
                    received += 1
                    if as_json:
                        print_json(
                            {**message_dict(delivery.message), "delivery_count": delivery.delivery_count}
                        )
                    else:
                        out.print(render(delivery.message, received, delivery.delivery_count))
                    if not no_ack:
                        await delivery.ack()
        finally:
            await consumer.close()
