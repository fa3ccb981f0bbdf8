"""Consumer groups of the embedded engine: ordered (Kafka-style) and shared (queue-style)."""

from .config import Backoff, CommitMode, OrderedGroupConfig, SharedGroupConfig
from .deadletter import ReportedError, dead_letter_stream, dead_letter_subject
from .delivery import Delivery
from .lag import PartitionLag
from .ordered import MemberState, OrderedGroup, OrderedMember
from .shared import SharedGroup, SharedMember

__all__ = [
    "Backoff",
    "CommitMode",
    "Delivery",
    "MemberState",
    "OrderedGroup",
    "OrderedGroupConfig",
    "OrderedMember",
    "PartitionLag",
    "ReportedError",
    "SharedGroup",
    "SharedGroupConfig",
    "SharedMember",
    "dead_letter_stream",
    "dead_letter_subject",
]
