"""pigeon's embedded durable broker: segmented partition logs, streams and (later) groups.

This package imports nothing from the layers above it (transport, app, server).
"""

from .config import Discard, Durability, StartAt, StreamConfig
from .engine import Engine, PartitionInfo, StreamInfo
from .groups import (
    Backoff,
    Delivery,
    MemberState,
    OrderedGroup,
    OrderedGroupConfig,
    OrderedMember,
    PartitionLag,
    SharedGroup,
    SharedGroupConfig,
    SharedMember,
)
from .stream import BatchAck, Expect, PubAck

__all__ = [
    "Backoff",
    "BatchAck",
    "Delivery",
    "Discard",
    "Durability",
    "Engine",
    "Expect",
    "MemberState",
    "OrderedGroup",
    "OrderedGroupConfig",
    "OrderedMember",
    "PartitionInfo",
    "PartitionLag",
    "PubAck",
    "SharedGroup",
    "SharedGroupConfig",
    "SharedMember",
    "StartAt",
    "StreamConfig",
    "StreamInfo",
]
