"""Version ids as the REST API takes them: a number from 1 to 2^31-1, ``latest`` or ``-1``."""

from __future__ import annotations

import enum

from .errors import InvalidVersionError

__all__ = ["LATEST", "MAX_VERSION", "VersionId", "parse_version"]

MAX_VERSION = 2**31 - 1


class _Latest(enum.Enum):
    LATEST = "latest"


LATEST = _Latest.LATEST
VersionId = int | _Latest


def parse_version(text: str) -> VersionId:
    if text.lower() == "latest" or text == "-1":
        return LATEST
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_VERSION:
        return int(text)
    raise InvalidVersionError(
        f"The specified version '{text}' is not a valid version id. "
        f'Allowed values are between [1, {MAX_VERSION}] and the string "latest"'
    )
