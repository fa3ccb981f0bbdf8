"""Configuration of consumer groups: ordered (Kafka-style) and shared (queue-style)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import InvalidConfigError
from ..config import StartAt, validate_name

CommitMode = Literal["message", "batch", "periodic"]


@dataclass(frozen=True)
class Backoff:
    """Delay before redelivering after the n-th failed delivery.

    Either an explicit list of delays (the last one repeats), or exponential growth from
    ``initial_s`` by ``multiplier`` up to ``max_s``, with up to ``jitter`` (a fraction) added
    at random so that failures do not retry in lockstep.
    """

    delays_s: tuple[float, ...] = ()
    initial_s: float = 1.0
    multiplier: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "delays_s", tuple(self.delays_s))
        for delay in self.delays_s:
            _number("backoff delay", delay, minimum=0)
        _number("backoff initial_s", self.initial_s, minimum=0)
        _number("backoff multiplier", self.multiplier, minimum=1)
        _number("backoff max_s", self.max_s, minimum=0)
        _number("backoff jitter", self.jitter, minimum=0, maximum=1)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based)."""
        if self.delays_s:
            return self.delays_s[min(failures, len(self.delays_s)) - 1]
        base = min(self.max_s, self.initial_s * self.multiplier ** (failures - 1))
        return base * (1 + self.jitter * (rng or random).random()) if self.jitter else base


@dataclass(frozen=True)
class OrderedGroupConfig:
    """A Kafka-style group: members split the partitions; each partition is read in order.

    ``commit`` says when acknowledged progress is made durable: after every message, when a
    fetched batch is fully acknowledged, or every ``commit_interval_s``. Progress is never
    committed before the message is acknowledged.
    """

    name: str
    start: StartAt = field(default_factory=StartAt.earliest)
    session_timeout_s: float = 45.0
    heartbeat_interval_s: float = 3.0
    max_poll_interval_s: float = 300.0
    commit: CommitMode = "batch"
    commit_interval_s: float = 5.0
    max_deliver: int | None = None
    backoff: Backoff | None = None
    dead_letter: bool = True

    def __post_init__(self) -> None:
        validate_name(self.name, "group")
        _start(self.start)
        _number("session_timeout_s", self.session_timeout_s, minimum=0.01)
        _number("heartbeat_interval_s", self.heartbeat_interval_s, minimum=0.001)
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise InvalidConfigError(
                f"group {self.name!r}: heartbeat_interval_s ({self.heartbeat_interval_s}) must be "
                f"below session_timeout_s ({self.session_timeout_s})"
            )
        _number("max_poll_interval_s", self.max_poll_interval_s, minimum=0.01)
        if self.commit not in ("message", "batch", "periodic"):
            raise InvalidConfigError(
                f"group {self.name!r}: commit must be 'message', 'batch' or 'periodic', not {self.commit!r}"
            )
        _number("commit_interval_s", self.commit_interval_s, minimum=0.001)
        _optional_int("max_deliver", self.max_deliver)
        _backoff(self.backoff)


@dataclass(frozen=True)
class SharedGroupConfig:
    """A queue-style group: any member gets any message, each leased to one member at a time.

    ``max_deliver`` None means unlimited (as in JetStream). ``key_ordered`` keeps messages of
    one key out of flight together and in offset order, while other keys proceed in parallel.
    """

    name: str
    start: StartAt = field(default_factory=StartAt.earliest)
    ack_wait_s: float = 30.0
    max_deliver: int | None = None
    backoff: Backoff | None = None
    max_ack_pending: int = 1000
    max_member_pending: int | None = None
    key_ordered: bool = False
    dead_letter: bool = True

    def __post_init__(self) -> None:
        validate_name(self.name, "group")
        _start(self.start)
        _number("ack_wait_s", self.ack_wait_s, minimum=0.001)
        _optional_int("max_deliver", self.max_deliver)
        _backoff(self.backoff)
        _positive_int("max_ack_pending", self.max_ack_pending)
        _optional_int("max_member_pending", self.max_member_pending)


def config_to_json(config: OrderedGroupConfig | SharedGroupConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": "ordered" if isinstance(config, OrderedGroupConfig) else "shared",
    }
    for name in config.__dataclass_fields__:
        value = getattr(config, name)
        if isinstance(value, StartAt):
            value = {"kind": value.kind, "value": value.value}
        elif isinstance(value, Backoff):
            value = {k: getattr(value, k) for k in value.__dataclass_fields__}
        data[name] = value
    return data


def config_from_json(data: dict[str, Any]) -> OrderedGroupConfig | SharedGroupConfig:
    data = dict(data)
    kind = data.pop("kind")
    data["start"] = StartAt(data["start"]["kind"], data["start"]["value"])
    if data.get("backoff") is not None:
        data["backoff"] = Backoff(**data["backoff"])
    cls = OrderedGroupConfig if kind == "ordered" else SharedGroupConfig
    return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _number(name: str, value: object, *, minimum: float, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidConfigError(f"{name} must be a number, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidConfigError(f"{name} must be {bound}, not {value}")


def _optional_int(name: str, value: object) -> None:
    if value is not None:
        _positive_int(name, value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}")


def _start(start: object) -> None:
    if not isinstance(start, StartAt):
        raise InvalidConfigError(f"start must be a StartAt, not {start!r}")


def _backoff(backoff: object) -> None:
    if backoff is not None and not isinstance(backoff, Backoff):
        raise InvalidConfigError(f"backoff must be a Backoff, not {backoff!r}")
