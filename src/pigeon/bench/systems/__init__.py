"""The systems compared, by the name used in ``--systems`` and the JSON.

Adapters are imported only when used, so a missing client library (an extra not installed)
costs that system its column, not the whole run.
"""

from __future__ import annotations

import importlib

from .base import System, Unreachable

__all__ = ["SYSTEMS", "System", "Unreachable", "load_system"]

# name -> "module:class" under pigeon.bench.systems, in the order of the table
SYSTEMS = {
    "pigeon_embedded": "pigeon_embedded:PigeonEmbedded",
    "pigeon_serve": "jetstream:PigeonServe",
    "pigeon_serve_busy_poll": "jetstream:PigeonServeBusyPoll",
    "nats_jetstream": "jetstream:NatsJetStream",
    "redis_streams": "redis_streams:RedisStreams",
    "rabbitmq": "rabbitmq:RabbitMQ",
    "postgres": "postgres:Postgres",
    "litequeue": "sqlite_queues:LiteQueueSystem",
    "persist_queue": "sqlite_queues:PersistQueueSystem",
    "floor_asyncio_queue": "floor_asyncio_queue:AsyncioQueue",
    "floor_file_append": "floor_file_append:FileAppend",
}

_EXTRAS = {
    "nats": "nats",
    "redis": "redis",
    "aio_pika": "rabbitmq",
    "asyncpg": "postgres",
    "litequeue": "bench",
    "persistqueue": "bench",
}


def load_system(name: str) -> type[System]:
    module, cls = SYSTEMS[name].split(":")
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ImportError as error:
        missing = (error.name or "").split(".")[0]
        extra = _EXTRAS.get(missing)
        hint = f"pip install 'pigeon[{extra}]'" if extra else f"pip install {missing}"
        raise Unreachable(f"its client library {missing} is not installed ({hint})") from error
    system: type[System] = getattr(loaded, cls)
    return system
