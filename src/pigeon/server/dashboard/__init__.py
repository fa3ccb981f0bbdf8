"""The web dashboard: static files shipped in the package, reading the admin API.

No build step and nothing fetched from a CDN: ``static/`` holds plain HTML, CSS and JavaScript
that work offline. Pages (hash-routed): overview, a stream, a group (with a lag chart drawn
from the samples the page takes), dead letters (detail, Reprocess, purge) and messages.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["dashboard_routes"]

STATIC = Path(__file__).resolve().parent / "static"


def dashboard_routes() -> list[BaseRoute]:
    async def index(request: object) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return [Route("/", index), Mount("/static", StaticFiles(directory=STATIC), name="static")]
