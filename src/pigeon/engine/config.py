"""Stream configuration: what a stream captures, how it is split, kept and made durable."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import InvalidConfigError, InvalidNameError
from ..subjects import validate_pattern

Durability = Literal["always", "interval", "never"]
Discard = Literal["old", "new"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where a read begins: ``StartAt.earliest()``, ``latest()``, ``offset(n)`` or ``time(t)``."""

    kind: str
    value: float = 0

    @classmethod
    def earliest(cls) -> StartAt:
        return cls("earliest")

    @classmethod
    def latest(cls) -> StartAt:
        return cls("latest")

    @classmethod
    def offset(cls, offset: int) -> StartAt:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidConfigError(f"start offset must be a non-negative integer, not {offset!r}")
        return cls("offset", offset)

    @classmethod
    def time(cls, timestamp: float) -> StartAt:
        """The first message stored at or after ``timestamp`` (seconds since the epoch)."""
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
            raise InvalidConfigError(f"start time must be seconds since the epoch, not {timestamp!r}")
        return cls("time", timestamp)


def validate_name(name: object, what: str = "stream") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidNameError(
            f"invalid {what} name {name!r}: use 1 to 64 letters, digits, '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class StreamConfig:
    """A stream: a name, the subject patterns it captures and a fixed number of partitions.

    Retention limits apply to the whole stream (all partitions together) and remove whole
    segments, never part of one; ``None`` means unlimited. With every limit unset the stream
    keeps everything (the log as a database).
    """

    name: str
    subjects: tuple[str, ...]
    partitions: int = 1
    durability: Durability = "interval"
    fsync_interval_ms: int = 100
    max_age_s: float | None = None
    max_bytes: int | None = None
    max_msgs: int | None = None
    max_msgs_per_subject: int | None = None
    discard: Discard = "old"
    dedup_window_s: float = 120.0
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_age_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.subjects, str) or not self.subjects:
            raise InvalidConfigError(
                f"stream {self.name!r}: subjects must be a non-empty list of patterns"
            )
        object.__setattr__(self, "subjects", tuple(validate_pattern(s) for s in self.subjects))
        _require(self, "partitions", self.partitions, int, minimum=1, maximum=4096)
        if self.durability not in ("always", "interval", "never"):
            raise InvalidConfigError(
                f"stream {self.name!r}: durability must be 'always', 'interval' or 'never', "
                f"not {self.durability!r}"
            )
        if self.discard not in ("old", "new"):
            raise InvalidConfigError(
                f"stream {self.name!r}: discard must be 'old' or 'new', not {self.discard!r}"
            )
        _require(self, "fsync_interval_ms", self.fsync_interval_ms, int, minimum=1)
        _require(self, "max_age_s", self.max_age_s, (int, float), minimum=0.001, optional=True)
        _require(self, "max_bytes", self.max_bytes, int, minimum=1, optional=True)
        _require(self, "max_msgs", self.max_msgs, int, minimum=1, optional=True)
        _require(self, "max_msgs_per_subject", self.max_msgs_per_subject, int, minimum=1, optional=True)
        _require(self, "dedup_window_s", self.dedup_window_s, (int, float), minimum=0)
        _require(self, "segment_bytes", self.segment_bytes, int, minimum=1024, maximum=2**31)
        _require(self, "segment_age_s", self.segment_age_s, (int, float), minimum=0.001, optional=True)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["subjects"] = list(self.subjects)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["subjects"] = tuple(known.get("subjects", ()))
        return cls(**known)


def _require(
    config: StreamConfig,
    name: str,
    value: object,
    kind: type | tuple[type, ...],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    optional: bool = False,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidConfigError(f"stream {config.name!r}: {name} must be a number, not {value!r}")
    assert isinstance(value, int | float)
    if minimum is not None and value < minimum:
        raise InvalidConfigError(f"stream {config.name!r}: {name} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise InvalidConfigError(f"stream {config.name!r}: {name} must be at most {maximum}, not {value}")
