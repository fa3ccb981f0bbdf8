"""Methods that handle event classes: ``@handles(Deposited)`` on aggregates and projections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .errors import EventDefinitionError

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__pigeon_handles__"


def handles(*event_types: type) -> Callable[[F], F]:
    """Mark a method as the one that handles events of these classes."""
    if not event_types or not all(isinstance(t, type) for t in event_types):
        raise EventDefinitionError(f"@handles takes event classes, not {event_types!r}")

    def mark(method: F) -> F:
        setattr(method, _MARK, event_types)
        return method

    return mark


def handler_table(cls: type) -> dict[type, str]:
    """Event class -> name of the method handling it, a subclass overriding its bases."""
    table: dict[type, str] = {}
    for klass in reversed(cls.__mro__):
        owners: dict[type, str] = {}
        for name, member in vars(klass).items():
            for event_type in getattr(member, _MARK, ()):
                if event_type in owners:
                    raise EventDefinitionError(
                        f"{klass.__qualname__} handles {event_type.__qualname__} twice "
                        f"({owners[event_type]} and {name})"
                    )
                owners[event_type] = name
        table.update(owners)
    return table
