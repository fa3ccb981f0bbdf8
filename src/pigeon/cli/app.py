"""The typer app: each command lives in its own module and is registered here.

User errors end as one line on stderr and a non-zero exit status, never a traceback: typer's
usage errors are caught in :func:`main` instead of being drawn as a help panel.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from . import bench, consume, demo, dlq, es, exporter, lag, pub, registry, replay, req, serve, stream, sub

__all__ = ["app", "main"]

app = typer.Typer(
    name="pigeon",
    help="pigeon: a durable message broker and its tools.",
    add_completion=True,
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
app.command("pub")(pub.pub)
app.command("sub")(sub.sub)
app.command("req")(req.req)
app.command("reply")(req.reply)
app.add_typer(stream.app, name="stream")
app.command("consume")(consume.consume)
app.command("replay")(replay.replay)
app.add_typer(dlq.app, name="dlq")
app.command("bench")(bench.bench)
app.command("demo")(demo.demo)
app.command("registry")(registry.registry)
app.add_typer(es.app, name="es")


def main(argv: Sequence[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name="pigeon", standalone_mode=False
        )
    except typer.TyperException as error:
        context = getattr(error, "ctx", None)
        where = context.command_path if context is not None else "pigeon"
        if message := error.format_message():  # none when the help was shown instead
            print(f"{where}: {message} (see `{where} --help`)", file=sys.stderr)
        return error.exit_code
    except typer.Abort:
        return 130
    return result if isinstance(result, int) else 0
