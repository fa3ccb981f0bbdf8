"""``pigeon replay STREAM``: read a stream from an offset or a time, to a subject or a file.

The reading is done by a temporary ordered group (each partition in offset order), deleted at
the end, so the stream's own groups are untouched. The replay covers what the stream held
when it started: messages published meanwhile are left for another run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Annotated

import typer

from ..engine.config import StartAt
from ..errors import InvalidConfigError
from ..message import Headers, Message, new_id
from ..transport.base import Consumer, ConsumerSpec, Received, Transport
from ._common import DEFAULT_URL, DataOption, JsonOption, UrlOption, ack_all, fail, opened, parse_time, run
from ._show import console, message_dict, print_json, progress_bars

__all__ = ["replay"]

_FETCH = 200
_STALL_S = 10.0  # no message and no progress for this long: the replay gives up


def replay(
    stream: Annotated[str, typer.Argument(help="The stream to read.")],
    from_offset: Annotated[
        int | None, typer.Option(min=0, help="Start at this offset (in each partition read).")
    ] = None,
    from_time: Annotated[
        float | None,
        typer.Option(
            parser=parse_time, metavar="ISO-8601", help="Start at the first message stored at or after."
        ),
    ] = None,
    partition: Annotated[int | None, typer.Option(min=0, help="Read only this partition.")] = None,
    to_subject: Annotated[
        str | None, typer.Option(help="Publish a copy of each message to this subject.")
    ] = None,
    to_file: Annotated[
        Path | None, typer.Option(help="Write the messages to this file as JSON lines ('-': stdout).")
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many messages.")] = None,
    url: UrlOption = DEFAULT_URL,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replay stored messages to a subject, or to JSON lines (stdout without a target)."""
    if from_offset is not None and from_time is not None:
        fail("replay", "give --from-offset or --from-time, not both", code=2)
    if to_subject is not None and to_file is not None:
        fail("replay", "give --to-subject or --to-file, not both", code=2)
    start = (
        StartAt.offset(from_offset)
        if from_offset is not None
        else StartAt.time(from_time)
        if from_time is not None
        else StartAt.earliest()
    )
    target = _Target(to_subject, to_file)
    run("replay", _replay(url, data, stream, start, partition, target, count, as_json))


class _Target:
    """Where replayed messages go: a subject, a file, or stdout (used as a context manager)."""

    def __init__(self, subject: str | None, file: Path | None) -> None:
        self.subject = subject
        self.file = None if file is None or str(file) == "-" else file
        self._out: IO[str] | None = None

    @property
    def to_stdout(self) -> bool:
        return self.subject is None and self.file is None

    def describe(self) -> str:
        if self.subject is not None:
            return f"subject {self.subject}"
        return "stdout" if self.file is None else str(self.file)

    def __enter__(self) -> _Target:
        if self.file is not None:
            self._out = self.file.open("w", encoding="utf-8")
        elif self.subject is None:
            self._out = sys.stdout
        return self

    def __exit__(self, *exc: object) -> None:
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()

    async def send(self, transport: Transport, messages: list[Message]) -> None:
        if self._out is not None:
            self._out.writelines(json.dumps(message_dict(m), ensure_ascii=False) + "\n" for m in messages)
            self._out.flush()
            return
        assert self.subject is not None
        # New ids: the copies are new messages, which a dedup window must not drop.
        copies = [
            Message(
                self.subject,
                m.payload,
                key=m.key,
                headers={k: v for k, v in m.headers.items() if k != Headers.MSG_ID},
            )
            for m in messages
        ]
        await transport.publish_batch(copies)


async def _replay(
    url: str,
    data: Path | None,
    stream: str,
    start: StartAt,
    partition: int | None,
    target: _Target,
    count: int | None,
    as_json: bool,
) -> None:
    async with opened(url, data) as transport:
        state = await transport.stream_state(stream)
        if partition is not None and partition >= state.partitions:
            raise InvalidConfigError(
                f"stream {stream} has {state.partitions} partition(s): no partition {partition}"
            )
        # The last offset of each partition read, as the replay starts: where it ends.
        ends = {p: last for p, last in enumerate(state.last_offsets) if partition in (None, p)}
        group = f"pigeon-replay-{new_id()[-12:]}"
        spec = ConsumerSpec(group, kind="ordered", start=start, dead_letter=False)
        consumer = await transport.consumer(stream, spec)
        try:
            with target:
                replayed = await _copy(transport, consumer, stream, group, ends, target, count)
        finally:
            try:
                await consumer.close()
            finally:
                await transport.delete_group(stream, group)
    summary = {"stream": stream, "replayed": replayed, "to": target.describe()}
    if as_json and not target.to_stdout:
        print_json(summary)
    else:
        # With the messages on stdout, the summary goes to stderr.
        console(stderr=target.to_stdout).print(
            f"replayed {replayed} messages from {stream} to {target.describe()}"
        )


async def _copy(
    transport: Transport,
    consumer: Consumer,
    stream: str,
    group: str,
    ends: dict[int, int],
    target: _Target,
    count: int | None,
) -> int:
    loop = asyncio.get_running_loop()
    left = await _unfinished(transport, stream, group, ends)
    total = sum(left.values()) if count is None else min(count, sum(left.values()))
    replayed = 0
    with progress_bars() as progress:
        task = progress.add_task("replaying", total=total)
        quiet_since = loop.time()
        while left and (count is None or replayed < count):
            batch = await consumer.fetch(_FETCH, 0.5)
            if not batch:
                left = await _unfinished(transport, stream, group, ends)
                if left and loop.time() - quiet_since > _STALL_S:
                    raise TimeoutError(f"replay of {stream} stalled: no message for {_STALL_S:.0f} s")
                continue
            quiet_since = loop.time()
            chosen = _chosen(batch, ends, left, None if count is None else count - replayed)
            await target.send(transport, chosen)
            # Acknowledged after they were sent; the rest (other partitions, newer messages) too.
            await ack_all(batch)
            replayed += len(chosen)
            progress.advance(task, len(chosen))
    return replayed


def _chosen(
    batch: Sequence[Received], ends: dict[int, int], left: dict[int, int], most: int | None
) -> list[Message]:
    chosen: list[Message] = []
    for delivery in batch:
        end = ends.get(delivery.partition)
        if end is None or delivery.partition not in left or delivery.offset > end:
            continue
        if most is not None and len(chosen) >= most:
            break
        chosen.append(delivery.message)
        if delivery.offset >= end:
            del left[delivery.partition]
    return chosen


async def _unfinished(transport: Transport, stream: str, group: str, ends: dict[int, int]) -> dict[int, int]:
    """Per partition not read to its end yet: how many messages are left to it."""
    left: dict[int, int] = {}
    for lag in await transport.lag(stream, group):
        end = ends.get(lag.partition)
        if end is not None and lag.committed <= end:
            left[lag.partition] = end + 1 - lag.committed
    return left
