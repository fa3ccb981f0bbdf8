"""``pigeon req`` sends a request and prints the reply; ``pigeon reply`` answers requests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..message import Headers
from ._common import (
    DEFAULT_URL,
    Header,
    JsonOption,
    UrlOption,
    headers_of,
    opened,
    parse_header,
    read_payload,
    run,
)
from ._show import console, message_dict, print_json, render

__all__ = ["reply", "req"]

HeaderOption = Annotated[
    list[Header] | None,
    typer.Option("--header", "-H", parser=parse_header, metavar="NAME=VALUE", help="A header (repeatable)."),
]


def req(
    subject: Annotated[str, typer.Argument(help="The subject a responder listens on.")],
    data: Annotated[str | None, typer.Argument(help="The request's payload ('-' reads stdin).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read the payload from this file.")] = None,
    header: HeaderOption = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds to wait for the reply.")] = 2.0,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Send a request and print the reply."""
    payload = read_payload("req", data, file)
    run("req", _req(url, subject, payload, headers_of(header), timeout, as_json))


async def _req(
    url: str, subject: str, payload: bytes, headers: dict[str, str], timeout: float, as_json: bool
) -> None:
    async with opened(url) as transport:
        answer = await transport.request(subject, payload, headers=headers, timeout=timeout)
    if as_json:
        print_json(message_dict(answer))
    else:
        console().print(render(answer, heading=False))  # its subject is only the reply inbox


def reply(
    subject: Annotated[str, typer.Argument(help="The subject (or pattern) to answer requests on.")],
    data: Annotated[
        str | None, typer.Argument(help="The answer to every request ('-' reads stdin); without it, an echo.")
    ] = None,
    header: HeaderOption = None,
    queue: Annotated[
        str | None, typer.Option(help="Join this queue group: each request goes to one of its members.")
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after answering this many requests.")] = None,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Answer every request on SUBJECT with DATA, or with the request's own payload; print each request."""
    answer = None if data is None else read_payload("reply", data)
    run("reply", _reply(url, subject, answer, headers_of(header), queue, count, as_json), interrupted=0)


async def _reply(
    url: str,
    subject: str,
    answer: bytes | None,
    headers: dict[str, str],
    queue: str | None,
    count: int | None,
    as_json: bool,
) -> None:
    out = console()
    async with opened(url) as transport:
        subscription = await transport.subscribe(subject, queue=queue)
        try:
            console(stderr=True).print(f"answering requests on {subject!r} (Ctrl-C to stop)")
            answered = 0
            while count is None or answered < count:
                request = await subscription.next()
                if Headers.REPLY_TO not in request.headers:
                    continue  # a plain publish expects no answer
                await transport.reply(request, request.payload if answer is None else answer, headers=headers)
                answered += 1
                if as_json:
                    print_json(message_dict(request))
                else:
                    out.print(render(request, answered))
        finally:
            await subscription.unsubscribe()
