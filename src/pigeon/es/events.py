"""Domain events: typed classes with a stable type name and a schema version, and upcasters.

An event is a dataclass or a pydantic model. `domain_event` gives it a type name (stored with
every event, so renaming the class does not orphan history) and a schema version. Events are
stored as JSON; a dataclass event holds JSON values (text, numbers, booleans, None, lists and
dicts of them), a pydantic model anything pydantic serialises.

Schemas evolve by bumping the version and registering an upcaster per step: a function from
the JSON data of version ``n`` to that of ``n + 1``. Old events are converted when read; the
log itself is never rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import (
    EventDecodeError,
    EventDefinitionError,
    EventEncodeError,
    UnknownEventTypeError,
    UpcastError,
)

__all__ = ["EventRegistry", "Upcaster", "domain_event", "event_type_of"]

E = TypeVar("E", bound=type)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_TYPE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")


def domain_event(name: str | None = None, *, version: int = 1) -> Callable[[E], E]:
    """Class decorator: ``@domain_event("AccountOpened", version=2)``; the name defaults to the
    class name (then renaming the class renames the stored type: prefer an explicit name)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EventDefinitionError(f"an event version is a positive integer, not {version!r}")

    def mark(cls: E) -> E:
        type_name = cls.__name__ if name is None else name
        if not isinstance(type_name, str) or not _TYPE_NAME.match(type_name):
            raise EventDefinitionError(
                f"event type name {type_name!r} of {cls.__qualname__}: use up to 128 letters, digits, "
                "'_', '.', ':' or '-', starting with a letter or '_'"
            )
        _check_event_class(cls)
        # Set on the class itself: a subclass must not inherit its parent's stored name.
        cls.__pigeon_event__ = (type_name, version)  # type: ignore[attr-defined]
        return cls

    return mark


def event_type_of(cls: type) -> tuple[str, int]:
    """The stored type name and current schema version of an event class."""
    declared = cls.__dict__.get("__pigeon_event__")
    if declared is None:
        _check_event_class(cls)
        return cls.__name__, 1
    name, version = declared
    return str(name), int(version)


def _check_event_class(cls: object) -> None:
    if not isinstance(cls, type) or not (dataclasses.is_dataclass(cls) or _is_pydantic(cls)):
        raise EventDefinitionError(f"an event class must be a dataclass or a pydantic model, not {cls!r}")


def _is_pydantic(cls: type) -> bool:
    return callable(getattr(cls, "model_validate", None)) and callable(getattr(cls, "model_dump", None))


class EventRegistry:
    """The event classes a store can read back, by type name, and the upcasters between versions."""

    def __init__(self, classes: Iterable[type] = ()) -> None:
        self._classes: dict[str, type] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self.register(*classes)

    def register(self, *classes: type) -> None:
        for cls in classes:
            name, _ = event_type_of(cls)
            known = self._classes.get(name)
            if known is not None and known is not cls:
                raise EventDefinitionError(
                    f"event type {name!r} is registered already for {known.__qualname__}, "
                    f"so {cls.__qualname__} needs another name"
                )
            self._classes[name] = cls

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: the function turns the data of ``from_version`` into ``from_version + 1``."""
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise EventDefinitionError(f"from_version is a positive integer, not {from_version!r}")

        def add(function: Upcaster) -> Upcaster:
            if (type_name, from_version) in self._upcasters:
                raise EventDefinitionError(
                    f"event type {type_name!r} has an upcaster from version {from_version} already"
                )
            self._upcasters[(type_name, from_version)] = function
            return function

        return add

    def __contains__(self, cls: object) -> bool:
        return isinstance(cls, type) and self._classes.get(event_type_of(cls)[0]) is cls

    def encode(self, event: object) -> tuple[str, int, bytes]:
        """The type name, schema version and JSON payload of an event of a registered class."""
        cls = type(event)
        name, version = event_type_of(cls)
        if self._classes.get(name) is not cls:
            raise UnknownEventTypeError(
                f"{cls.__qualname__} is not registered with this store's EventRegistry: add it "
                "(EventRegistry.register, or list it in the aggregate's events)"
            )
        try:
            data = (
                event.model_dump(mode="json")  # type: ignore[attr-defined]
                if _is_pydantic(cls)
                else dataclasses.asdict(event)  # type: ignore[call-overload]
            )
            return name, version, json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise EventEncodeError(
                f"event {name!r} cannot be stored as JSON ({exc}): keep dataclass events to JSON "
                "values, or use a pydantic model"
            ) from None

    def decode(self, type_name: str, version: int, payload: bytes) -> Any:
        """The event object, upcast from ``version`` to its class's current version."""
        cls = self._classes.get(type_name)
        if cls is None:
            raise UnknownEventTypeError(
                f"a stored event has type {type_name!r}, which this store's EventRegistry does not know: "
                "register its class"
            )
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise EventDecodeError(f"a stored {type_name!r} event is not JSON: {exc}") from None
        current = event_type_of(cls)[1]
        if version > current:
            raise UpcastError(
                f"a stored {type_name!r} event has schema version {version}, newer than this code's "
                f"{current}: deploy the newer event class"
            )
        for step in range(version, current):
            upcast = self._upcasters.get((type_name, step))
            if upcast is None:
                raise UpcastError(
                    f"no upcaster for {type_name!r} from version {step} to {step + 1}: register one "
                    "with EventRegistry.upcaster"
                )
            data = upcast(data)
        try:
            if _is_pydantic(cls):
                return cls.model_validate(data)  # type: ignore[attr-defined]
            return cls(**data)
        except Exception as exc:  # dataclasses raise TypeError, pydantic its own ValidationError
            raise EventDecodeError(
                f"a stored {type_name!r} event (schema {version}, now {current}) does not fit "
                f"{cls.__qualname__}: {exc}"
            ) from None
