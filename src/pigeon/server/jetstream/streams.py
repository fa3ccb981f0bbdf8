"""Streams as JetStream shows them: nats-server's configuration JSON to and from StreamConfig.

Only single-partition streams are visible through JetStream: a JetStream sequence is one
position in one log, which is the offset + 1 of partition 0.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ...engine import Engine, StreamConfig
from ...engine.config import Durability
from ...engine.engine import StreamInfo
from ...errors import InvalidSubjectError
from ...subjects import patterns_overlap, validate_pattern
from .errors import (
    ApiError,
    invalid_json,
    not_supported,
    replicas_unsupported,
    stream_config_invalid,
    stream_name_mismatch,
    stream_not_found,
    update_refused,
)

__all__ = [
    "CREATED_KEY",
    "check_visible",
    "config_from_json",
    "config_to_json",
    "created_ns",
    "max_msg_size",
    "rfc3339",
    "same_jetstream_settings",
    "state_json",
    "updated_config",
]

# Where the creation time lives in the engine's stream metadata (which compares as equal
# whatever it holds, so re-creating a stream with the same settings still matches).
CREATED_KEY = "_pigeon.created"
_INTERNAL_PREFIX = "_pigeon."
_DESCRIPTION_KEY = "_pigeon.description"
_MAX_MSG_SIZE_KEY = "_pigeon.max_msg_size"
_NS = 1_000_000_000
_DEFAULT_DUPLICATE_WINDOW_NS = 120 * _NS


def rfc3339(ns: int) -> str:
    """nats-server's timestamp text: UTC, nanoseconds; the zero time for 0."""
    if ns <= 0:
        return "0001-01-01T00:00:00Z"
    seconds, fraction = divmod(ns, _NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


_MIN_WINDOW_NS = 100_000_000  # nats-server's floor for max_age and duplicate_window
_MAX_DESCRIPTION = 4096
_INTEGERS = (
    "max_msgs",
    "max_bytes",
    "max_age",
    "max_msgs_per_subject",
    "max_msg_size",
    "duplicate_window",
    "num_replicas",
    "max_consumers",
    "first_seq",
)
_CHOICES = {
    "retention": ("limits", "interest", "workqueue"),
    "storage": ("file", "memory"),
    "discard": ("old", "new"),
    "compression": ("none", "s2"),
}
# Settings pigeon does not implement: refused when set rather than silently ignored. (no_ack,
# deny_delete, deny_purge, allow_rollup_hdrs and allow_msg_ttl are taken and not acted on, as
# before: nats-py's key-value buckets set the last four, and put, get and delete work without.)
_UNSUPPORTED = (
    "mirror",
    "sources",
    "sealed",
    "subject_transform",
    "republish",
    "discard_new_per_subject",
    "subject_delete_marker_ttl",
)


def _check_types(data: dict[str, Any]) -> None:
    """What nats-server's JSON decoding refuses (invalid JSON, 10025) before reading the config."""
    for field in _INTEGERS:
        value = data.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid_json(f"{field} must be an integer, not {value!r}")
    for field, choices in _CHOICES.items():
        value = data.get(field)
        if value is not None and value not in choices:
            raise invalid_json(f"{field} must be one of {', '.join(choices)}, not {value!r}")
    for field in ("name", "description"):
        if not isinstance(data.get(field, ""), str | None):
            raise invalid_json(f"{field} must be a string")
    subjects = data.get("subjects")
    if subjects is not None and (
        not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects)
    ):
        raise invalid_json("subjects must be a list of subjects")
    metadata = data.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise invalid_json("metadata must be an object of strings")


def _limit(data: dict[str, Any], field: str) -> int | None:
    """A JetStream limit (type-checked already): absent, 0 or negative mean unlimited."""
    value: int = data.get(field) or 0
    return value if value > 0 else None


def _check_subjects(subjects: list[str], no_ack: bool) -> None:
    """nats-server's rules for a stream's own subjects (its 10052 answers)."""
    for subject in subjects:
        try:
            validate_pattern(subject)
        except InvalidSubjectError:
            raise stream_config_invalid("invalid subject") from None
        if no_ack:
            continue  # a stream that never answers may capture the API subjects too
        if subject == ">":
            raise stream_config_invalid("capturing all subjects requires no-ack to be true")
        if patterns_overlap(subject, "$JS.>") or patterns_overlap(subject, "$JSC.>"):
            raise stream_config_invalid("subjects that overlap with jetstream api require no-ack to be true")
        if patterns_overlap(subject, "$SYS.>"):
            raise stream_config_invalid("subjects that overlap with system api require no-ack to be true")
    for i, subject in enumerate(subjects):
        for other in subjects[i + 1 :]:
            if patterns_overlap(subject, other):
                raise stream_config_invalid(f'subject "{subject}" overlaps with "{other}"')


def _windows(data: dict[str, Any]) -> tuple[int, int]:
    """(max_age, duplicate_window) in nanoseconds, defaulted and checked as nats-server does."""
    max_age: int = data.get("max_age") or 0
    window: int = data.get("duplicate_window") or 0
    if max_age < 0:
        raise stream_config_invalid("max age can not be negative")
    if window == 0:
        # Unset: two minutes, or the max age when that is shorter.
        window = max_age if 0 < max_age < _DEFAULT_DUPLICATE_WINDOW_NS else _DEFAULT_DUPLICATE_WINDOW_NS
    if 0 < max_age < _MIN_WINDOW_NS:
        raise stream_config_invalid("max age needs to be >= 100ms")
    if window < 0:
        raise stream_config_invalid("duplicates window can not be negative")
    if window < _MIN_WINDOW_NS:
        raise stream_config_invalid("duplicates window needs to be >= 100ms")
    if max_age and window > max_age:
        raise stream_config_invalid("duplicates window can not be larger then max age")
    return max_age, window


def config_from_json(
    name: str, data: dict[str, Any], created_ns: int, durability: Durability = "interval"
) -> StreamConfig:
    """A CREATE request's configuration as an engine StreamConfig (raises ApiError).

    What JetStream has and the engine's StreamConfig has not (the description, max_msg_size)
    is kept in the stream's metadata under ``_pigeon.`` keys, persisted with it.
    """
    _check_types(data)
    # null, like absent, is the default (Go decodes it as the zero value).
    if (data.get("retention") or "limits") != "limits":
        raise not_supported(f"retention {data['retention']!r}")
    if (data.get("storage") or "file") != "file":
        raise not_supported(f"storage {data['storage']!r}")
    replicas = data.get("num_replicas") or 1
    if replicas < 0:
        raise ApiError(400, 10133, "replicas count cannot be negative")
    if replicas > 1:
        raise replicas_unsupported()
    description = data.get("description") or ""
    if len(description) > _MAX_DESCRIPTION:
        raise stream_config_invalid(f"stream description is too long, maximum allowed is {_MAX_DESCRIPTION}")
    for feature in _UNSUPPORTED:
        if data.get(feature):
            raise not_supported(feature)
    if (data.get("first_seq") or 1) > 1:
        raise not_supported("first_seq")
    if (data.get("max_consumers") or 0) > 0:
        raise not_supported("max_consumers")
    subjects = data.get("subjects") or [name]
    _check_subjects(subjects, bool(data.get("no_ack")))
    max_age_ns, window_ns = _windows(data)
    extra = {CREATED_KEY: str(created_ns)}
    if description:
        extra[_DESCRIPTION_KEY] = description
    size_limit = _limit(data, "max_msg_size")
    if size_limit is not None:
        extra[_MAX_MSG_SIZE_KEY] = str(size_limit)
    try:
        return StreamConfig(
            name=name,
            subjects=tuple(subjects),
            durability=durability,
            max_msgs=_limit(data, "max_msgs"),
            max_bytes=_limit(data, "max_bytes"),
            max_msgs_per_subject=_limit(data, "max_msgs_per_subject"),
            max_age_s=max_age_ns / _NS if max_age_ns else None,
            dedup_window_s=window_ns / _NS,
            discard="new" if data.get("discard") == "new" else "old",
            metadata=_user_metadata(data.get("metadata") or {}) | extra,
        )
    except ValueError as error:  # InvalidConfigError, InvalidNameError, InvalidSubjectError
        raise stream_config_invalid(str(error)) from None


def updated_config(old: StreamConfig, data: dict[str, Any]) -> StreamConfig:
    """An UPDATE request's configuration for the stream ``old`` (raises ApiError).

    Refuses what nats-server refuses to change, with its answers; how the engine stores the
    stream (durability, segments) stays as it was created.
    """
    _check_types(data)
    given = data.get("name")
    if not given:
        raise stream_config_invalid("stream name is required and can not contain '.', '*', '>', '\\', '/'")
    if given != old.name:
        raise stream_name_mismatch()
    if (data.get("storage") or "file") != "file":
        raise update_refused("storage type")
    if data.get("retention") == "workqueue":
        raise update_refused("retention policy to/from workqueue")
    wanted = config_from_json(old.name, data, created_ns(old), old.durability)
    if wanted.max_msgs_per_subject != old.max_msgs_per_subject:
        # The engine keeps per-subject counts only for streams created with that limit.
        raise update_refused("max messages per subject")
    return dataclasses.replace(
        wanted,
        fsync_interval_ms=old.fsync_interval_ms,
        segment_bytes=old.segment_bytes,
        segment_age_s=old.segment_age_s,
    )


def _user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if not k.startswith(_INTERNAL_PREFIX)}


def same_jetstream_settings(a: StreamConfig, b: StreamConfig) -> bool:
    """Whether the settings kept in metadata (which the engine does not compare) are equal."""
    keys = (_DESCRIPTION_KEY, _MAX_MSG_SIZE_KEY)
    return all(a.metadata.get(k) == b.metadata.get(k) for k in keys)


def max_msg_size(config: StreamConfig) -> int | None:
    """The largest message (headers and payload) the stream takes, None for any."""
    text = config.metadata.get(_MAX_MSG_SIZE_KEY, "")
    return int(text) if text.isdigit() else None


def _unlimited(value: int | None) -> int:
    return -1 if value is None else value


def config_to_json(config: StreamConfig) -> dict[str, Any]:
    description = config.metadata.get(_DESCRIPTION_KEY)
    described = {"description": description} if description else {}
    return {
        "name": config.name,
        **described,
        "subjects": list(config.subjects),
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": _unlimited(config.max_msgs),
        "max_bytes": _unlimited(config.max_bytes),
        "max_age": 0 if config.max_age_s is None else round(config.max_age_s * _NS),
        "max_msgs_per_subject": _unlimited(config.max_msgs_per_subject),
        "max_msg_size": max_msg_size(config) or -1,
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
        "metadata": _user_metadata(config.metadata),
    }


def created_ns(config: StreamConfig) -> int:
    text = config.metadata.get(CREATED_KEY, "")
    return int(text) if text.isdigit() else 0


def state_json(engine: Engine, info: StreamInfo) -> dict[str, Any]:
    part = info.partitions[0]
    first_ts = 0
    if part.messages:
        first = engine.fetch(info.config.name, 0, part.first_offset, 1)
        first_ts = round(first[0].timestamp * 1_000_000) * 1000 if first else 0
    # The last message's time outlives it (a purge keeps it), as in nats-server.
    last_ts = round((part.last_timestamp or 0) * 1_000_000) * 1000
    # nats-server leaves num_subjects out when there are none.
    subjects = engine.subject_count(info.config.name)
    # An emptied stream reports the sequence after its last, as nats-server does after a purge.
    first_seq = part.first_offset + 1 if part.messages else (part.next_offset + 1 if part.next_offset else 0)
    return {
        "messages": part.messages,
        "bytes": part.bytes,
        "first_seq": first_seq,
        "first_ts": rfc3339(first_ts),
        "last_seq": part.next_offset,
        "last_ts": rfc3339(last_ts),
        **({"num_subjects": subjects} if subjects else {}),
        "consumer_count": len(engine.groups(info.config.name)),
    }


def check_visible(info: StreamInfo) -> None:
    if len(info.partitions) != 1:
        raise stream_not_found()
