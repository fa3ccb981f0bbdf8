"""Streams as JetStream shows them: nats-server's configuration JSON to and from StreamConfig.

Only single-partition streams are visible through JetStream: a JetStream sequence is one
position in one log, which is the offset + 1 of partition 0.
"""

from __future__ import annotations

import time
from typing import Any

from ...engine import Engine, StreamConfig
from ...engine.engine import StreamInfo
from .errors import not_supported, stream_config_invalid, stream_not_found

__all__ = [
    "CREATED_KEY",
    "check_visible",
    "config_from_json",
    "config_to_json",
    "created_ns",
    "rfc3339",
    "state_json",
]

# Where the creation time lives in the engine's stream metadata (which compares as equal
# whatever it holds, so re-creating a stream with the same settings still matches).
CREATED_KEY = "_pigeon.created"
_NS = 1_000_000_000
_DEFAULT_DUPLICATE_WINDOW_S = 120.0


def rfc3339(ns: int) -> str:
    """nats-server's timestamp text: UTC, nanoseconds; the zero time for 0."""
    if ns <= 0:
        return "0001-01-01T00:00:00Z"
    seconds, fraction = divmod(ns, _NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _limit(data: dict[str, Any], field: str) -> int | None:
    """A JetStream limit: absent, 0 or -1 mean unlimited."""
    value = data.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise stream_config_invalid(f"{field} must be an integer, not {value!r}")
    return value if value > 0 else None


def config_from_json(name: str, data: dict[str, Any], created_ns: int) -> StreamConfig:
    """A CREATE request's configuration as an engine StreamConfig (raises ApiError)."""
    if data.get("retention", "limits") != "limits":
        raise not_supported(f"retention {data['retention']!r}")
    if data.get("storage", "file") != "file":
        raise not_supported(f"storage {data['storage']!r}")
    if data.get("num_replicas", 1) not in (0, 1):
        raise not_supported("more than one replica")
    for feature in ("mirror", "sources", "sealed", "subject_transform", "republish"):
        if data.get(feature):
            raise not_supported(feature)
    subjects = data.get("subjects") or [name]
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise stream_config_invalid("subjects must be a list of subjects")
    max_age_ns = _limit(data, "max_age")
    window_ns = _limit(data, "duplicate_window")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise stream_config_invalid("metadata must be an object")
    try:
        return StreamConfig(
            name=name,
            subjects=tuple(subjects),
            max_msgs=_limit(data, "max_msgs"),
            max_bytes=_limit(data, "max_bytes"),
            max_msgs_per_subject=_limit(data, "max_msgs_per_subject"),
            max_age_s=None if max_age_ns is None else max_age_ns / _NS,
            dedup_window_s=_DEFAULT_DUPLICATE_WINDOW_S if window_ns is None else window_ns / _NS,
            discard="new" if data.get("discard") == "new" else "old",
            metadata={str(k): str(v) for k, v in metadata.items()} | {CREATED_KEY: str(created_ns)},
        )
    except ValueError as error:  # InvalidConfigError, InvalidNameError, InvalidSubjectError
        raise stream_config_invalid(str(error)) from None


def _unlimited(value: int | None) -> int:
    return -1 if value is None else value


def config_to_json(config: StreamConfig) -> dict[str, Any]:
    return {
        "name": config.name,
        "subjects": list(config.subjects),
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": _unlimited(config.max_msgs),
        "max_bytes": _unlimited(config.max_bytes),
        "max_age": 0 if config.max_age_s is None else round(config.max_age_s * _NS),
        "max_msgs_per_subject": _unlimited(config.max_msgs_per_subject),
        "max_msg_size": -1,
        "discard": config.discard,
        "storage": "file",
        "num_replicas": 1,
        "duplicate_window": round(config.dedup_window_s * _NS),
        "compression": "none",
        # pigeon answers DIRECT.GET on every stream.
        "allow_direct": True,
        "mirror_direct": False,
        "sealed": False,
        "deny_delete": False,
        "deny_purge": False,
        "allow_rollup_hdrs": False,
        "consumer_limits": {},
        "metadata": {k: v for k, v in config.metadata.items() if k != CREATED_KEY},
    }


def created_ns(config: StreamConfig) -> int:
    text = config.metadata.get(CREATED_KEY, "")
    return int(text) if text.isdigit() else 0


def state_json(engine: Engine, info: StreamInfo) -> dict[str, Any]:
    part = info.partitions[0]
    first_ts = last_ts = 0
    if part.messages:
        first = engine.fetch(info.config.name, 0, part.first_offset, 1)
        first_ts = round(first[0].timestamp * 1_000_000) * 1000 if first else 0
        last_ts = round((part.last_timestamp or 0) * 1_000_000) * 1000
    # An emptied stream reports the sequence after its last, as nats-server does after a purge.
    first_seq = part.first_offset + 1 if part.messages else (part.next_offset + 1 if part.next_offset else 0)
    return {
        "messages": part.messages,
        "bytes": part.bytes,
        "first_seq": first_seq,
        "first_ts": rfc3339(first_ts),
        "last_seq": part.next_offset,
        "last_ts": rfc3339(last_ts),
        "consumer_count": len(engine.groups(info.config.name)),
    }


def check_visible(info: StreamInfo) -> None:
    if len(info.partitions) != 1:
        raise stream_not_found()
