"""The automatic redrive policy of a handler's group: dead letters go back after a while.

Many failures are temporary (a dependency down for an hour). With
``@app.subscriber(..., redrive=RedrivePolicy(after_s=3600, max_redrives=3))`` the app checks
the group's dead letters every ``check_every_s`` and sends those older than ``after_s`` back
to their subject. The poison guard: a letter already redriven ``max_redrives`` times stays
parked for a person to look at (``pigeon dlq``, the dashboard, or `DeadLetters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from ..errors import InvalidConfigError
from ..patterns.deadletters import DeadLetters
from ..transport.base import Transport

log = logging.getLogger("pigeon.app")


@dataclass(frozen=True)
class RedrivePolicy:
    after_s: float = 3600.0
    max_redrives: int = 3
    check_every_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("after_s", "check_every_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidConfigError(f"redrive {name} must be a number of seconds >= 0, not {value!r}")
        if self.check_every_s == 0:
            raise InvalidConfigError("redrive check_every_s must be positive")
        if (
            isinstance(self.max_redrives, bool)
            or not isinstance(self.max_redrives, int)
            or self.max_redrives < 1
        ):
            raise InvalidConfigError(
                f"redrive max_redrives must be a positive integer, not {self.max_redrives!r}"
            )

    async def run(self, transport: Transport, stream: str, group: str, stop: asyncio.Event) -> None:
        """Apply the policy until ``stop`` is set; a failed pass is logged and tried again later."""
        box = DeadLetters(transport, stream, group)
        try:
            while not stop.is_set():
                try:
                    report = await box.auto_redrive(min_age_s=self.after_s, max_redrives=self.max_redrives)
                    if report.redriven:
                        log.info("group %s on %s: redrove %d dead letters", group, stream, report.redriven)
                except Exception as exc:
                    log.warning("group %s on %s: redrive pass failed: %r", group, stream, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.check_every_s)
        finally:
            await box.close()
