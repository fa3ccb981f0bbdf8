"""``pigeon pub SUBJECT [DATA]``: publish one message, or ``--count N`` of them.

A subject a stream captures is stored (the PubAck is printed); any other reaches only the
core subscribers listening now ("core only"), as on NATS.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from ..engine.stream import PubAck
from ..message import Message
from ..transport.base import Transport
from ._common import (
    DEFAULT_URL,
    Header,
    JsonOption,
    UrlOption,
    fail,
    headers_of,
    opened,
    parse_header,
    read_payload,
    run,
)
from ._show import ack_dict, ack_text, console, print_json, progress_bars

__all__ = ["pub"]

_BATCH = 100  # messages per publish_batch with --count


def pub(
    subject: Annotated[str, typer.Argument(help="The subject to publish to.")],
    data: Annotated[
        str | None,
        typer.Argument(help="The payload ('-' reads stdin). {n} becomes the message's number."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read the payload from this file.")] = None,
    key: Annotated[
        str | None,
        typer.Option(help="The key: picks the partition, keeps per-key order; {n} works here too."),
    ] = None,
    header: Annotated[
        list[Header] | None,
        typer.Option(
            "--header", "-H", parser=parse_header, metavar="NAME=VALUE", help="A header (repeatable)."
        ),
    ] = None,
    msg_id: Annotated[
        str | None,
        typer.Option("--id", help="The message id, for deduplication; {n} becomes the message's number."),
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="Publish this many messages.")] = 1,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Publish a message; print where it was stored, or that it was core only."""
    if msg_id is not None and count > 1 and "{n}" not in msg_id:
        fail("pub", "--count with one --id would store one message: put {n} in the id", code=2)
    template = _Template(subject, read_payload("pub", data, file), key, headers_of(header), msg_id)
    run("pub", _pub(url, template, count, as_json))


class _Template:
    """The message to send, numbered: ``{n}`` in the payload, the key and the id becomes 1, 2, ..."""

    def __init__(
        self, subject: str, payload: bytes, key: str | None, headers: dict[str, str], msg_id: str | None
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.key = key
        self.headers = headers
        self.msg_id = msg_id

    def number(self, n: int) -> Message:
        text = str(n)
        return Message(
            self.subject,
            self.payload.replace(b"{n}", text.encode()),
            key=None if self.key is None else self.key.replace("{n}", text),
            headers=self.headers,
            id=None if self.msg_id is None else self.msg_id.replace("{n}", text),
        )


async def _pub(url: str, template: _Template, count: int, as_json: bool) -> None:
    async with opened(url) as transport:
        started = time.perf_counter()
        acks = await _publish_many(transport, template, count)
        seconds = time.perf_counter() - started
    if count == 1:
        if as_json:
            print_json(ack_dict(acks[0]))
        else:
            console().print(ack_text(acks[0], template.subject))
        return
    summary = _summary(acks, seconds)
    if as_json:
        print_json(summary)
        return
    stored = f"{summary['stored']} stored"
    if summary["streams"]:
        stored += f" in {', '.join(summary['streams'])}"
    console().print(
        f"published {count} messages in {seconds:.2f} s ({summary['rate']:.0f}/s): {stored}, "
        f"{summary['duplicates']} duplicates, {summary['core_only']} core only"
    )


async def _publish_many(transport: Transport, template: _Template, count: int) -> list[PubAck | None]:
    acks: list[PubAck | None] = []
    with progress_bars(enabled=count > 1) as progress:
        task = progress.add_task("publishing", total=count)
        for start in range(1, count + 1, _BATCH):
            batch = [template.number(n) for n in range(start, min(start + _BATCH, count + 1))]
            acks += await transport.publish_batch(batch)
            progress.advance(task, len(batch))
    return acks


def _summary(acks: list[PubAck | None], seconds: float) -> dict[str, Any]:
    streams = Counter(a.stream for a in acks if a is not None)
    return {
        "published": len(acks),
        "stored": sum(streams.values()),
        "duplicates": sum(1 for a in acks if a is not None and a.duplicate),
        "core_only": sum(1 for a in acks if a is None),
        "streams": sorted(streams),
        "seconds": round(seconds, 6),
        "rate": round(len(acks) / seconds, 1) if seconds > 0 else 0.0,
    }
