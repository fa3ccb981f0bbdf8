"""``pigeon stream``: add, list, inspect, purge and remove streams."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import StreamNotFoundError
from ..transport.base import StreamSpec, StreamState
from ._common import (
    DEFAULT_URL,
    DataOption,
    JsonOption,
    UrlOption,
    confirm,
    opened,
    parse_duration,
    parse_size,
    run,
)
from ._show import console, print_json

__all__ = ["app"]

app = typer.Typer(help="Add, list, inspect, purge and remove streams.", no_args_is_help=True)

YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The stream's name (letters, digits, '-' and '_').")],
    subject: Annotated[
        list[str], typer.Option("--subject", "-s", help="A subject pattern the stream captures (repeatable).")
    ],
    partitions: Annotated[int, typer.Option(min=1, help="Partitions (messages are split by key).")] = 1,
    max_age: Annotated[
        float | None,
        typer.Option(parser=parse_duration, metavar="DURATION", help="Drop older messages (15m, 7d)."),
    ] = None,
    max_msgs: Annotated[int | None, typer.Option(min=1, help="Keep at most this many messages.")] = None,
    max_bytes: Annotated[
        int | None,
        typer.Option(parser=parse_size, metavar="SIZE", help="Keep at most this many bytes (64M)."),
    ] = None,
    dedup_window: Annotated[
        float | None,
        typer.Option(
            parser=parse_duration, metavar="DURATION", help="How long message ids are remembered [2m]."
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Create a stream; nothing changes if it exists with the same settings."""
    limits: dict[str, Any] = {"max_age_s": max_age, "max_msgs": max_msgs, "max_bytes": max_bytes}
    if dedup_window is not None:
        limits["dedup_window_s"] = dedup_window
    run("stream add", _add(url, name, subject, partitions, limits, as_json))


async def _add(
    url: str, name: str, subjects: list[str], partitions: int, limits: dict[str, Any], as_json: bool
) -> None:
    spec = StreamSpec(name, tuple(subjects), partitions, **limits)
    async with opened(url) as transport:
        try:
            await transport.stream_state(name)
            existed = True
        except StreamNotFoundError:
            existed = False
        await transport.create_stream(spec)
        state = await transport.stream_state(name)
    if as_json:
        print_json({**_state_dict(state), "created": not existed})
    else:
        done = "exists already, unchanged" if existed else "created"
        console().print(
            f"stream {name} {done}: {', '.join(state.subjects)}, {_plural(state.partitions, 'partition')}"
        )


@app.command("ls")
def ls(url: UrlOption = DEFAULT_URL, data: DataOption = None, as_json: JsonOption = False) -> None:
    """List the streams, with their subjects and message counts."""
    run("stream ls", _ls(url, data, as_json))


async def _ls(url: str, data: Any, as_json: bool) -> None:
    states: list[StreamState] = []
    async with opened(url, data) as transport:
        for name in await transport.list_streams():
            try:
                states.append(await transport.stream_state(name))
            except StreamNotFoundError:
                continue  # deleted since it was listed
    if as_json:
        print_json([_state_dict(s) for s in states])
        return
    table = Table("stream", "subjects", "partitions", "messages", title=_plural(len(states), "stream"))
    for s in states:
        table.add_row(s.name, ", ".join(s.subjects), str(s.partitions), str(s.messages))
    console().print(table)


@app.command("info")
def info(
    name: Annotated[str, typer.Argument(help="The stream.")],
    url: UrlOption = DEFAULT_URL,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a stream: subjects, messages, and the last offset of each partition."""
    run("stream info", _info(url, data, name, as_json))


async def _info(url: str, data: Any, name: str, as_json: bool) -> None:
    async with opened(url, data) as transport:
        state = await transport.stream_state(name)
    if as_json:
        print_json(_state_dict(state))
        return
    out = console()
    out.print(
        f"stream {state.name}: {', '.join(state.subjects)}, {_plural(state.messages, 'message')} stored"
    )
    table = Table("partition", "last offset")
    for partition, last in enumerate(state.last_offsets):
        table.add_row(str(partition), "-" if last < 0 else str(last))
    out.print(table)


@app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="The stream.")],
    yes: YesOption = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete a stream with its messages, groups and their dead letters."""
    run("stream rm", _rm(url, name, yes))


async def _rm(url: str, name: str, yes: bool) -> None:
    async with opened(url) as transport:
        state = await transport.stream_state(name)
        confirm(
            "stream rm",
            f"Delete stream {name} with its {_plural(state.messages, 'message')}, groups and dead letters?",
            yes,
        )
        await transport.delete_stream(name)
    console().print(f"deleted stream {name}")


@app.command("purge")
def purge(
    name: Annotated[str, typer.Argument(help="The stream.")],
    yes: YesOption = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Remove every message of a stream; the stream and its groups stay."""
    run("stream purge", _purge(url, name, yes))


async def _purge(url: str, name: str, yes: bool) -> None:
    async with opened(url) as transport:
        state = await transport.stream_state(name)
        confirm("stream purge", f"Remove the {_plural(state.messages, 'message')} of stream {name}?", yes)
        await transport.purge_stream(name)
    console().print(f"purged stream {name}: {_plural(state.messages, 'message')} removed")


def _state_dict(state: StreamState) -> dict[str, Any]:
    return {
        "name": state.name,
        "subjects": list(state.subjects),
        "partitions": state.partitions,
        "messages": state.messages,
        "last_offsets": list(state.last_offsets),
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
