"""How the commands show messages and acknowledgements, to people and as JSON."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.json import JSON
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..engine.stream import PubAck
from ..message import Message

__all__ = ["ack_dict", "ack_text", "console", "message_dict", "print_json", "progress_bars", "render"]


def console(*, stderr: bool = False) -> Console:
    # No markup or highlighting: payloads and names are shown as they are.
    return Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True)


def progress_bars(*, enabled: bool = True) -> Progress:
    """Bars on stderr for long work, one per task (its description is the label); nothing at
    all when stderr is not a terminal, so pipes and scripts get clean output."""
    err = console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not (enabled and err.is_terminal),
    )


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def ack_dict(ack: PubAck | None) -> dict[str, Any]:
    if ack is None:
        return {"stored": False}
    return {
        "stored": True,
        "stream": ack.stream,
        "partition": ack.partition,
        "offset": ack.offset,
        "duplicate": ack.duplicate,
    }


def ack_text(ack: PubAck | None, subject: str) -> str:
    if ack is None:
        return f"core only: no stream captures {subject!r}, delivered to current subscribers"
    where = f"stream {ack.stream} partition {ack.partition} offset {ack.offset}"
    return f"duplicate, already stored in {where}" if ack.duplicate else f"stored in {where}"


def message_dict(message: Message) -> dict[str, Any]:
    """A message as JSON: the payload as UTF-8 text when it is, else base64."""
    out: dict[str, Any] = {"subject": message.subject, "id": message.id, "key": message.key}
    if message.stream is not None:
        out.update(stream=message.stream, partition=message.partition, offset=message.offset)
    out["timestamp"] = _iso(message.timestamp)
    out["headers"] = dict(message.headers)
    try:
        out["payload"] = message.payload.decode()
        out["encoding"] = "utf-8"
    except UnicodeDecodeError:
        out["payload"] = base64.b64encode(message.payload).decode()
        out["encoding"] = "base64"
    return out


def render(
    message: Message, number: int | None = None, delivery: int = 1, *, heading: bool = True
) -> RenderableType:
    """One message for people: where it came from, its headers, and its payload (JSON indented)."""
    lines: list[RenderableType] = [_heading(message, number, delivery)] if heading else []
    for name, value in message.headers.items():
        lines.append(Text(f"  {name}: {value}", style="dim"))
    lines.append(_payload(message.payload))
    return Group(*lines)


def _heading(message: Message, number: int | None, delivery: int) -> Text:
    head = Text()
    if number is not None:
        head.append(f"[#{number}] ", style="dim")
    head.append(message.subject, style="bold")
    if message.key is not None:
        head.append(f"  key={message.key}", style="cyan")
    if message.stream is not None:
        head.append(f"  {message.stream}[{message.partition}]@{message.offset}", style="dim")
    if delivery > 1:
        head.append(f"  delivery {delivery}", style="yellow")
    return head


def _payload(payload: bytes) -> RenderableType:
    if not payload:
        return Text("(empty)", style="dim")
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return Text(f"({len(payload)} bytes) {payload!r}")
    try:
        json.loads(text)
    except ValueError:
        return Text(text)
    return JSON(text, indent=2, highlight=True)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
