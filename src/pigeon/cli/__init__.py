"""The ``pigeon`` command line. ``main`` is the console script's entry point."""

from .app import app, main

__all__ = ["app", "main"]
