"""`pigeon serve` as a real process, for the tests that need one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

T = 10.0
SERVE = (sys.executable, "-m", "pigeon.cli", "serve")
# The README's run command; the options given after it override the folder and ports it sets.
README_RUN = ("bash", str(Path(__file__).resolve().parent.parent / "scripts" / "run"))
LISTENING = re.compile(r"listening: NATS (nats://\S+):(\d+), HTTP (http://\S+), data ")


class Served:
    """One `pigeon serve` process; its stderr goes to a file the test reads."""

    def __init__(self, data: Path, port: int = 0, *extra: str, command: tuple[str, ...] = SERVE) -> None:
        self.data = data
        self.log = data.parent / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    *command,
                    "--data",
                    str(data),
                    "--port",
                    str(port),
                    "--http-port",
                    "0",
                    *extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.nats_url = ""
        self.http_url = ""
        self.port = 0

    def wait_listening(self, timeout: float = T) -> Served:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.stderr())
            if found:
                self.nats_url = f"{found[1]}:{found[2]}"
                self.port = int(found[2])
                self.http_url = found[3].rstrip(",")
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"pigeon serve exited {self.process.returncode}: {self.stderr()}")
            time.sleep(0.02)
        self.kill()  # no orphan left serving after the test gave up on it
        raise AssertionError(f"pigeon serve did not start within {timeout} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(T)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(T)
