"""``pigeon dlq``: a group's dead letters, listed, shown, sent back to their subjects or purged.

Through `pigeon.patterns.deadletters.DeadLetters`, so a letter dealt with here is gone for
every process, and these commands work on any transport with dead letters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import InvalidConfigError
from ..patterns.deadletters import DeadLetter, DeadLetters
from ._common import DEFAULT_URL, DataOption, JsonOption, UrlOption, confirm, fail, opened, run
from ._show import console, message_dict, print_json, progress_bars, render

__all__ = ["app"]

app = typer.Typer(help="A group's dead letters: list, show, redrive, purge.", no_args_is_help=True)

StreamArg = Annotated[str, typer.Argument(help="The stream.")]
GroupArg = Annotated[str, typer.Argument(help="The consumer group whose dead letters these are.")]
IdsOption = Annotated[
    list[str] | None, typer.Option("--id", help="A dead letter's id, from `pigeon dlq ls` (repeatable).")
]
_EVERY = 10_000  # as many as one DeadLetters call handles


@asynccontextmanager
async def _box(url: str, data: Path | None, stream: str, group: str) -> AsyncIterator[DeadLetters]:
    async with opened(url, data) as transport:
        await transport.lag(stream, group)  # an unknown stream or group is a mistake, not an empty box
        letters = DeadLetters(transport, stream, group)
        try:
            yield letters
        finally:
            await letters.close()


@app.command("ls")
def ls(
    stream: StreamArg,
    group: GroupArg,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    url: UrlOption = DEFAULT_URL,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the pending dead letters, oldest first."""
    run("dlq ls", _ls(url, data, stream, group, limit, as_json))


async def _ls(url: str, data: Path | None, stream: str, group: str, limit: int, as_json: bool) -> None:
    async with _box(url, data, stream, group) as box:
        letters = await box.list(limit)
    if as_json:
        print_json([_letter_dict(letter) for letter in letters])
        return
    # Two lines a letter rather than a table: ids are long, and are copied whole into the
    # other dlq commands, so they must not be cut or wrapped at any width.
    out = console()
    out.print(f"{stream} / {group}: {len(letters)} dead letter(s), oldest first", style="bold")
    for letter in letters:
        failed = letter.failed_at.strftime("%Y-%m-%d %H:%M:%S") if letter.failed_at else "?"
        out.print(
            f"{letter.id}  {letter.original_subject or '(no subject)'}  failed {failed} "
            f"({_age(letter.age_s)} ago)  redriven {letter.redrive_count}"
        )
        error = f"{letter.error_type}: {letter.error_message}" if letter.error_type else letter.error_message
        out.print(f"    {error}", style="red")


@app.command("show")
def show(
    stream: StreamArg,
    group: GroupArg,
    letter_id: Annotated[
        str, typer.Argument(metavar="ID", help="The dead letter's id, from `pigeon dlq ls`.")
    ],
    url: UrlOption = DEFAULT_URL,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter: why it failed, its headers and payload."""
    run("dlq show", _show(url, data, stream, group, letter_id, as_json))


async def _show(url: str, data: Path | None, stream: str, group: str, letter_id: str, as_json: bool) -> None:
    async with _box(url, data, stream, group) as box:
        found = [letter for letter in await box.list(_EVERY) if letter.id == letter_id]
    if not found:
        raise InvalidConfigError(f"no pending dead letter {letter_id!r} in {stream}/{group}")
    letter = found[0]
    if as_json:
        print_json(_letter_dict(letter))
        return
    out = console()
    out.print(f"dead letter {letter.id} of {stream}/{group}, from {letter.original_subject or '(unknown)'}")
    out.print(f"  error: {letter.error_type}: {letter.error_message}")
    failed = letter.failed_at.isoformat(timespec="seconds") if letter.failed_at else "unknown"
    out.print(f"  failed at {failed} ({_age(letter.age_s)} ago), redriven {letter.redrive_count} time(s)")
    out.print(render(letter.message))


@app.command("redrive")
def redrive(
    stream: StreamArg,
    group: GroupArg,
    letter_id: IdsOption = None,
    every: Annotated[bool, typer.Option("--all", help="Redrive every pending dead letter.")] = False,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Publish dead letters back to their subjects, for the group to process again."""
    if bool(letter_id) == every:
        fail("dlq redrive", "choose the dead letters with --id ID (repeatable) or --all", code=2)
    run("dlq redrive", _redrive(url, stream, group, letter_id or [], as_json))


async def _redrive(url: str, stream: str, group: str, ids: list[str], as_json: bool) -> None:
    async with _box(url, None, stream, group) as box:
        if ids:
            _check_ids(ids, await box.list(_EVERY), stream, group)
        with progress_bars() as progress:
            task = progress.add_task("redriving", total=None)

            def advance(sent: int, total: int) -> None:
                progress.update(task, completed=sent, total=total)

            done = await (
                box.redrive(ids, progress=advance) if ids else box.redrive(all=True, progress=advance)
            )
    if as_json:
        print_json({"stream": stream, "group": group, "redriven": done})
    else:
        console().print(f"redrove {done} dead letter(s) of {stream}/{group} to their subjects")


@app.command("purge")
def purge(
    stream: StreamArg,
    group: GroupArg,
    letter_id: IdsOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Remove dead letters for good: the ones named with --id, or all of them."""
    run("dlq purge", _purge(url, stream, group, letter_id or [], yes, as_json))


async def _purge(url: str, stream: str, group: str, ids: list[str], yes: bool, as_json: bool) -> None:
    async with _box(url, None, stream, group) as box:
        if ids:
            _check_ids(ids, await box.list(_EVERY), stream, group)
        which = f"{len(set(ids))} dead letter(s)" if ids else "every dead letter"
        confirm("dlq purge", f"Remove {which} of {stream}/{group} for good?", yes)
        done = await (box.purge(ids) if ids else box.purge(all=True))
    if as_json:
        print_json({"stream": stream, "group": group, "purged": done})
    else:
        console().print(f"purged {done} dead letter(s) of {stream}/{group}")


def _check_ids(ids: list[str], pending: list[DeadLetter], stream: str, group: str) -> None:
    known = {letter.id for letter in pending}
    missing = [i for i in ids if i not in known]
    if missing:
        raise InvalidConfigError(
            f"no pending dead letter {', '.join(map(repr, missing))} in {stream}/{group}"
        )


def _letter_dict(letter: DeadLetter) -> dict[str, Any]:
    return {**letter.summary(), "message": message_dict(letter.message)}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
