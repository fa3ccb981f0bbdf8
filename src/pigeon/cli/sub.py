"""``pigeon sub PATTERN``: print the messages published on matching subjects from now on.

A core subscription (at most once, nothing stored): a stream's stored messages are read with
``pigeon consume`` or ``pigeon replay`` instead.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import DEFAULT_URL, JsonOption, UrlOption, opened, run
from ._show import console, message_dict, print_json, render

__all__ = ["sub"]


def sub(
    pattern: Annotated[str, typer.Argument(help="Subjects to listen to; '*' and '>' are wildcards.")],
    queue: Annotated[
        str | None, typer.Option(help="Join this queue group: each message goes to one of its members.")
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many messages.")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Stop when no message arrives for this many seconds."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Print messages as they arrive: subject, key, headers and payload (JSON indented)."""
    run("sub", _sub(url, pattern, queue, count, timeout, as_json), interrupted=0)


async def _sub(
    url: str, pattern: str, queue: str | None, count: int | None, timeout: float | None, as_json: bool
) -> None:
    out = console()
    async with opened(url) as transport:
        subscription = await transport.subscribe(pattern, queue=queue)
        try:
            in_queue = f" in queue {queue!r}" if queue else ""
            console(stderr=True).print(f"listening on {pattern!r}{in_queue} (Ctrl-C to stop)")
            received = 0
            while count is None or received < count:
                try:
                    message = await subscription.next(timeout)
                except TimeoutError:
                    if count is None:
                        return
                    raise TimeoutError(
                        f"{received} of {count} messages; none came in the last {timeout} s"
                    ) from None
                received += 1
                if as_json:
                    print_json(message_dict(message))
                else:
                    out.print(render(message, received))
        finally:
            await subscription.unsubscribe()
