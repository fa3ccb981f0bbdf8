"""The typer app: each command lives in its own module and is registered here.

User errors end as one line on stderr and a non-zero exit status, never a traceback: typer's
usage errors are caught in :func:`main` instead of being drawn as a help panel.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from . import exporter, lag, serve

__all__ = ["app", "main"]

app = typer.Typer(
    name="pigeon",
    help="pigeon: a durable message broker and its tools.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """pigeon: a durable message broker and its tools."""
    # A callback keeps typer in command-group mode with a single command, so `pigeon serve`
    # stays `pigeon serve` when more commands arrive.


app.command("serve")(serve.serve)
app.command("exporter")(exporter.exporter)
app.command("lag")(lag.lag)


def main(argv: Sequence[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name="pigeon", standalone_mode=False
        )
    except typer.TyperException as error:
        print(f"pigeon: {error.format_message()} (see `pigeon --help`)", file=sys.stderr)
        return error.exit_code
    except typer.Abort:
        return 130
    return result if isinstance(result, int) else 0
