"""Worked examples of pigeon; run each from the repository root with ``python -m examples.<name>``."""
