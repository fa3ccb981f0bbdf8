"""pigeon's embedded durable broker: segmented partition logs, streams and (later) groups.

This package imports nothing from the layers above it (transport, app, server).
"""

from .config import Discard, Durability, StreamConfig
from .engine import Engine, PartitionInfo, StartAt, StreamInfo
from .stream import BatchAck, Expect, PubAck

__all__ = [
    "BatchAck",
    "Discard",
    "Durability",
    "Engine",
    "Expect",
    "PartitionInfo",
    "PubAck",
    "StartAt",
    "StreamConfig",
    "StreamInfo",
]
