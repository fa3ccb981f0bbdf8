"""Idempotency stores: remember which messages each consumer group has processed.

``SqlIdempotencyStore`` (the ``sql`` extra; the ``mysql`` extra for MySQL/MariaDB) commits
the claim in the handler's own transaction. ``RedisIdempotencyStore`` (the ``redis`` extra)
is lighter but not transactional with the handler. Each is imported on first use, so this
package needs neither library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ...errors import MissingExtraError
from .base import Claim, IdempotencyStore

if TYPE_CHECKING:
    from .redis import RedisIdempotencyStore
    from .sql import SqlIdempotencyStore

__all__ = ["Claim", "IdempotencyStore", "RedisIdempotencyStore", "SqlIdempotencyStore"]

# name -> (module, the extra that installs its client library)
_LAZY = {"SqlIdempotencyStore": ("sql", "sql"), "RedisIdempotencyStore": ("redis", "redis")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, extra = _LAZY[name]
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        library = (exc.name or extra).partition(".")[0]
        raise MissingExtraError(f"{name} needs {library}: pip install 'pigeon[{extra}]'") from exc
    return getattr(loaded, name)
