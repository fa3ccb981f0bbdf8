"""The stream registry's records, and the arithmetic of Redis stream ids and offsets."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...engine.config import validate_name
from ...errors import InvalidConfigError, InvalidNameError, StreamExistsError, SubjectOverlapError
from ...subjects import patterns_overlap
from ..base import ConsumerSpec, StreamSpec

MAX_SEQ = 18446744073709551615  # the largest sequence part of a Redis stream id


async def cmd(target: Any, *args: Any) -> Any:
    """A raw Redis command (redis-py's ``execute_command`` carries no type annotations)."""
    return await target.execute_command(*args)


@dataclass(frozen=True)
class StreamRecord:
    """A stream as the registry describes it, with the script arguments derived from it."""

    name: str
    subjects: tuple[str, ...]
    partitions: int
    max_age_s: float | None
    max_msgs: int | None
    dedup_window_s: float

    @classmethod
    def from_record(cls, name: str, record: bytes | str) -> StreamRecord:
        data = json.loads(record)
        return cls(
            name,
            tuple(data["subjects"]),
            int(data["partitions"]),
            data.get("max_age_s"),
            data.get("max_msgs"),
            float(data.get("dedup_window_s", 120.0)),
        )

    @classmethod
    def from_spec(cls, spec: StreamSpec) -> StreamRecord:
        return cls(
            spec.name, spec.subjects, spec.partitions, spec.max_age_s, spec.max_msgs, spec.dedup_window_s
        )

    def record(self) -> str:
        return json.dumps(
            {
                "subjects": list(self.subjects),
                "partitions": self.partitions,
                "max_age_s": self.max_age_s,
                "max_msgs": self.max_msgs,
                "dedup_window_s": self.dedup_window_s,
            }
        )

    @property
    def maxlen_arg(self) -> str:
        # max_msgs bounds the whole stream; Redis trims each partition's stream on its own.
        return "" if self.max_msgs is None else str(math.ceil(self.max_msgs / self.partitions))

    @property
    def max_age_arg(self) -> str:
        return "" if self.max_age_s is None else str(max(1, int(self.max_age_s * 1000)))

    @property
    def dedup_arg(self) -> str:
        return "" if self.dedup_window_s <= 0 else str(max(1, int(self.dedup_window_s * 1000)))


def parse_registry(records: Mapping[bytes, bytes]) -> dict[str, StreamRecord]:
    return {name.decode(): StreamRecord.from_record(name.decode(), data) for name, data in records.items()}


def check_limits(spec: StreamSpec) -> None:
    if spec.max_msgs is not None and (
        isinstance(spec.max_msgs, bool) or not isinstance(spec.max_msgs, int) or spec.max_msgs < 1
    ):
        raise InvalidConfigError(f"stream {spec.name!r}: max_msgs must be a positive integer")
    for name in ("max_age_s", "dedup_window_s"):
        value = getattr(spec, name)
        if value is None and name == "max_age_s":
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value < 0
            or (name == "max_age_s" and value == 0)
        ):
            raise InvalidConfigError(f"stream {spec.name!r}: {name} must be a positive number, not {value!r}")


def check_create(wanted: StreamRecord, existing: dict[str, StreamRecord]) -> bool:
    """True when the stream exists already the same way; raises when it cannot be created."""
    current = existing.get(wanted.name)
    if current is not None:
        if current.subjects != wanted.subjects or current.partitions != wanted.partitions:
            raise StreamExistsError(
                f"stream {wanted.name!r} exists with subjects {list(current.subjects)} and "
                f"{current.partitions} partitions"
            )
        return True
    for other in existing.values():
        for mine in wanted.subjects:
            for theirs in other.subjects:
                if patterns_overlap(mine, theirs):
                    raise SubjectOverlapError(
                        f"stream {wanted.name!r} subject {mine!r} overlaps {theirs!r} "
                        f"of stream {other.name!r}"
                    )
    return False


def dead_letter_name(stream: str, group: str) -> str:
    name = f"{stream}-{group}-dlq"
    try:
        return validate_name(name)
    except InvalidNameError:
        raise InvalidNameError(
            f"group {group!r} on stream {stream!r}: the dead-letter stream name {name!r} would "
            "exceed 64 characters; use shorter names or dead_letter=False"
        ) from None


def spec_record(spec: ConsumerSpec) -> dict[str, Any]:
    backoff = spec.backoff
    return {
        "kind": spec.kind,
        "start": [spec.start.kind, spec.start.value],
        "ack_wait_s": spec.ack_wait_s,
        "max_deliver": spec.max_deliver,
        "backoff": None
        if backoff is None
        else {k: getattr(backoff, k) for k in backoff.__dataclass_fields__},
        "max_ack_pending": spec.max_ack_pending,
        "dead_letter": spec.dead_letter,
    }


def offset_of(entry: Sequence[Any]) -> int:
    fields = entry[1]
    if isinstance(fields, Mapping):
        return int(fields[b"o"])
    return int(fields[fields.index(b"o") + 1])


def id_number(entry_id: bytes) -> int:
    ms, seq = entry_id.split(b"-")
    return int(ms) << 64 | int(seq)


def id_text(number: int) -> str:
    return f"{number >> 64}-{number & MAX_SEQ}"


def id_before(ms: int, seq: int) -> str:
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{MAX_SEQ}"
    return "0"
