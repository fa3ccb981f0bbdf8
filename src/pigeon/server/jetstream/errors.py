"""JetStream API errors: nats-server's status code, error code and description.

Clients branch on ``err_code`` (nats-py raises NotFoundError for 404, and callers compare
``err_code`` to tell a missing stream from a missing consumer), so these are the same numbers
nats-server sends, checked against it by the differential test.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "ack_policy_not_updatable",
    "bad_request",
    "consumer_exists",
    "consumer_not_found",
    "expected_stream_mismatch",
    "invalid_json",
    "message_too_large",
    "no_message_found",
    "not_supported",
    "store_failed",
    "stream_config_invalid",
    "stream_name_in_use",
    "stream_name_mismatch",
    "stream_not_found",
    "subjects_overlap",
    "update_refused",
    "wrong_last_sequence",
]


class ApiError(Exception):
    """An error answer to a JetStream request; ``body()`` is its ``"error"`` object."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.err_code = err_code
        self.description = description

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "err_code": self.err_code, "description": self.description}


def bad_request(description: str = "bad request") -> ApiError:
    return ApiError(400, 10003, description)


def not_supported(what: str) -> ApiError:
    # nats-server has no such error: pigeon answers a bad request that says what is missing.
    return bad_request(f"{what} is not supported by pigeon's JetStream")


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, 10025, f"invalid JSON: {detail}")


def stream_not_found() -> ApiError:
    return ApiError(404, 10059, "stream not found")


def stream_name_in_use() -> ApiError:
    return ApiError(400, 10058, "stream name already in use with a different configuration")


def stream_name_mismatch() -> ApiError:
    return ApiError(400, 10056, "stream name in subject does not match request")


def subjects_overlap() -> ApiError:
    return ApiError(400, 10065, "subjects overlap with an existing stream")


def stream_config_invalid(detail: str) -> ApiError:
    return ApiError(500, 10052, detail)


def consumer_not_found() -> ApiError:
    return ApiError(404, 10014, "consumer not found")


def expected_stream_mismatch() -> ApiError:
    return ApiError(400, 10060, "expected stream does not match")


def wrong_last_sequence(actual_seq: int) -> ApiError:
    return ApiError(400, 10071, f"wrong last sequence: {actual_seq}")


def consumer_exists() -> ApiError:
    return ApiError(400, 10148, "consumer already exists")


def ack_policy_not_updatable() -> ApiError:
    return ApiError(500, 10012, "ack policy can not be updated")


def message_too_large() -> ApiError:
    return ApiError(400, 10054, "message size exceeds maximum allowed")


def store_failed(detail: str) -> ApiError:
    return ApiError(503, 10077, detail)


def no_message_found() -> ApiError:
    return ApiError(404, 10037, "no message found")


def update_refused(what: str) -> ApiError:
    return ApiError(500, 10052, f"stream configuration update can not change {what}")


def replicas_unsupported() -> ApiError:
    return ApiError(500, 10074, "replicas > 1 not supported in non-clustered mode")
