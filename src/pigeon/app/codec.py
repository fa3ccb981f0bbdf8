"""Payloads to and from the types handlers declare.

The decoded type comes from the handler's annotation: ``bytes`` (as stored), ``str``
(UTF-8), ``dict``/``list``/`typing.Any` (JSON), a dataclass (JSON object, passed to the
constructor; nested dataclasses stay dicts), or a pydantic model (validated JSON). Anything
that does not decode is `PayloadDecodeError`: the message is poison and is dead-lettered
at once. A different wire format plugs in by passing another `Codec` to the `App`.

Codecs are asynchronous and told the subject because some need the network and the subject:
a schema-registry codec looks schemas up by id, and registers them under a name derived from
the subject (Confluent's subject name strategies).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Protocol

from ..errors import PayloadDecodeError, PayloadEncodeError
from ..message import Headers

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


class Codec(Protocol):
    async def decode(self, payload: bytes, target: Any, subject: str) -> Any:
        """The payload as ``target`` (the handler's annotation); `PayloadDecodeError` if it is not."""
        ...

    async def encode(self, value: Any, subject: str) -> tuple[bytes, dict[str, str]]:
        """The payload for ``subject`` and the headers describing it (e.g. Content-Type)."""
        ...


def _pydantic_model(target: Any) -> bool:
    validate = getattr(target, "model_validate_json", None)
    return isinstance(target, type) and callable(validate)


class JsonCodec:
    """The default codec: JSON for structured values, raw bytes and UTF-8 text as they are."""

    async def decode(self, payload: bytes, target: Any, subject: str = "") -> Any:
        if target is bytes or target is None:
            return payload
        try:
            if target is str:
                return payload.decode()
            if _pydantic_model(target):
                return target.model_validate_json(payload)
            data = json.loads(payload)
            if dataclasses.is_dataclass(target) and isinstance(target, type):
                if not isinstance(data, dict):
                    raise TypeError(f"expected a JSON object, got {type(data).__name__}")
                return target(**data)
            expected = typing.get_origin(target) or target
            if expected is not Any and isinstance(expected, type) and not isinstance(data, expected):
                raise TypeError(f"expected {expected.__name__}, got {type(data).__name__}")
            return data
        except PayloadDecodeError:
            raise
        except Exception as exc:  # each library signals bad input its own way
            name = getattr(target, "__name__", str(target))
            raise PayloadDecodeError(
                f"payload does not decode to {name}: {type(exc).__name__}: {exc}"
            ) from exc

    async def encode(self, value: Any, subject: str = "") -> tuple[bytes, dict[str, str]]:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value), {}
        if isinstance(value, str):
            return value.encode(), {Headers.CONTENT_TYPE: TEXT}
        dump = getattr(value, "model_dump_json", None)
        if callable(dump):
            return str(dump()).encode(), {Headers.CONTENT_TYPE: JSON}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        try:
            return json.dumps(value, separators=(",", ":")).encode(), {Headers.CONTENT_TYPE: JSON}
        except (TypeError, ValueError) as exc:
            raise PayloadEncodeError(f"cannot encode {type(value).__name__} as a payload: {exc}") from exc
