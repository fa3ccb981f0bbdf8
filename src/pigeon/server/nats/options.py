"""How a :class:`~pigeon.server.nats.server.NatsServer` listens, limits and authenticates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidConfigError

__all__ = ["DEFAULT_PORT", "ServerOptions"]

# Not 4222, so that pigeon serve and a real nats-server can run side by side.
DEFAULT_PORT = 4333


@dataclass(frozen=True)
class ServerOptions:
    """Server settings. ``verbose``, ``pedantic``, ``echo`` are per client, sent in its CONNECT.

    Authentication is a ``token`` or a ``user`` with ``password`` (not both). With
    ``tls_cert`` and ``tls_key`` every client must upgrade to TLS after the INFO line.
    ``max_pending_bytes`` bounds the bytes queued for one client: a client over it is a slow
    consumer and is disconnected. Every ``ping_interval_s`` the server PINGs each client and
    drops one with more than ``max_pings_out`` PINGs unanswered (a stale connection).
    ``auth_timeout_s`` bounds the TLS handshake and, when authentication is on, the wait
    for CONNECT.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    server_name: str = "pigeon"
    max_payload: int = 1024 * 1024
    max_pending_bytes: int = 64 * 1024 * 1024
    max_control_line: int = 4096
    ping_interval_s: float = 120.0
    max_pings_out: int = 2
    auth_timeout_s: float = 2.0
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise InvalidConfigError(f"port must be an integer from 0 to 65535, not {self.port!r}")
        for name in ("max_payload", "max_pending_bytes", "max_control_line", "max_pings_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}")
        if self.max_pending_bytes < self.max_payload:
            raise InvalidConfigError(
                f"max_pending_bytes ({self.max_pending_bytes}) must be at least max_payload "
                f"({self.max_payload}), or no full-size message could ever be delivered"
            )
        for name in ("ping_interval_s", "auth_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise InvalidConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.token is not None and (self.user is not None or self.password is not None):
            raise InvalidConfigError("use either token or user/password authentication, not both")
        if (self.user is None) != (self.password is None):
            raise InvalidConfigError("user and password must be given together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidConfigError("tls_cert and tls_key must be given together")

    @property
    def auth_required(self) -> bool:
        return self.token is not None or self.user is not None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
