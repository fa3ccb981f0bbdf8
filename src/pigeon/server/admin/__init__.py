"""The HTTP admin API of ``pigeon serve``, under ``/api/`` (docs/admin-api.md)."""

from .app import AdminConfig, admin_routes

__all__ = ["AdminConfig", "admin_routes"]
