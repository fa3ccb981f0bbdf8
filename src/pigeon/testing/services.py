"""Reaching the real services tests run against.

Under ``CI=true`` a service that cannot be reached fails the test: CI must prove every
transport. Elsewhere the test is skipped with the reason, so a laptop without RabbitMQ can
still run the rest.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

SERVICES = {
    "nats": ("127.0.0.1", 4222),
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
    "postgres": ("127.0.0.1", 5432),
    "mariadb": ("127.0.0.1", 3306),
}

URLS = {
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
}


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str) -> str:
    """The service's URL, or skip (fail under CI=true) when it cannot be reached."""
    host, port = SERVICES[name]
    if not reachable(host, port):
        message = f"{name} is not reachable on {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI requires every service)")
        pytest.skip(message)
    return URLS.get(name, f"{host}:{port}")


def unique_name(prefix: str = "t") -> str:
    """A name no other test (or earlier run) uses: streams, groups, queues, tables."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
