"""Every user mistake is a 4xx with ``{"error": {"code", "message"}}``, never a 500."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ...errors import (
    DeliveryNotOwnedError,
    GroupExistsError,
    GroupHasMembersError,
    GroupNotFoundError,
    InvalidConfigError,
    InvalidMessageError,
    InvalidNameError,
    InvalidSubjectError,
    PigeonError,
    StreamExistsError,
    StreamNotFoundError,
    SubjectOverlapError,
)

_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (StreamNotFoundError, 404, "stream_not_found"),
    (GroupNotFoundError, 404, "group_not_found"),
    (StreamExistsError, 409, "stream_exists"),
    (GroupExistsError, 409, "group_exists"),
    (GroupHasMembersError, 409, "group_has_members"),
    (SubjectOverlapError, 409, "subjects_overlap"),
    (DeliveryNotOwnedError, 409, "busy"),
    (InvalidNameError, 400, "invalid_name"),
    (InvalidSubjectError, 400, "invalid_subject"),
    (InvalidConfigError, 400, "invalid_config"),
    (InvalidMessageError, 400, "invalid_request"),
)


class ApiProblem(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def from_error(error: Exception) -> JSONResponse:
    if isinstance(error, ApiProblem):
        return problem(error.status, error.code, str(error))
    for cls, status, code in _STATUS:
        if isinstance(error, cls):
            return problem(status, code, str(error))
    if isinstance(error, PigeonError):
        return problem(409, "refused", str(error))
    raise error


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as error:
        raise ApiProblem(400, "invalid_json", f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiProblem(400, "invalid_json", "the body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiProblem(422, "missing_field", f"{name!r} is required")
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ApiProblem(422, "wrong_type", f"{name!r} has the wrong type")
    if not isinstance(value, kind):
        raise ApiProblem(422, "wrong_type", f"{name!r} has the wrong type")
    return value


def query_int(request: Request, name: str, default: int | None, *, minimum: int = 0) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiProblem(400, "invalid_parameter", f"{name} must be an integer, not {text!r}") from None
    if value < minimum:
        raise ApiProblem(400, "invalid_parameter", f"{name} must be at least {minimum}")
    return value


def query_float(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ApiProblem(400, "invalid_parameter", f"{name} must be a number, not {text!r}") from None
