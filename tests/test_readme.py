"""The README's examples are executed, so they cannot rot.

A ``python`` block followed by a ``text`` block must print each line of the text block (in
any order: handlers run concurrently). The quickstart also runs unchanged but for its URL on
every service, because the README says it does.
"""

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pigeon.testing.services import require_service, unique_name
from pigeon.transport import connect

README = Path(__file__).resolve().parent.parent / "README.md"
QUICKSTART_URL = "file://./pigeon-quickstart"


def examples() -> list[tuple[str, list[str]]]:
    """(code, the lines it must print) for every python block; no lines when none are shown."""
    blocks = re.findall(r"```(python|text)\n(.*?)```", README.read_text(), flags=re.S)
    found: list[tuple[str, list[str]]] = []
    for kind, body in blocks:
        if kind == "python":
            found.append((body, []))
        elif found and not found[-1][1]:
            found[-1] = (found[-1][0], body.splitlines())
    return found


def run(code: str, cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def quickstart() -> tuple[str, list[str]]:
    (found,) = [(code, lines) for code, lines in examples() if QUICKSTART_URL in code]
    return found


def test_first_block_holds_exactly_the_two_setup_commands() -> None:
    first = re.search(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/run", "bash scripts/test"]


def test_python_examples_print_what_the_readme_says(tmp_path: Path) -> None:
    found = examples()
    assert len(found) >= 2, "the README shows the quickstart and the engine"
    for number, (code, expected) in enumerate(found):
        folder = tmp_path / str(number)  # each example starts from an empty folder
        folder.mkdir()
        printed = run(code, folder)
        assert printed, "every example shows something"
        if expected:
            assert sorted(printed) == sorted(expected)


@pytest.mark.parametrize("service", ["pigeon serve", "nats", "redis", "rabbitmq", "postgres"])
def test_the_quickstart_runs_on_every_service_by_changing_the_url(
    service: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("pigeon_serve_url") if service == "pigeon serve" else require_service(service)
    )
    code, expected = quickstart()
    # Fresh names, so the run cannot meet another test's (or an earlier run's) stream.
    name = unique_name("readme").replace("-", "_")
    code = code.replace(QUICKSTART_URL, url).replace("orders", name)
    try:
        printed = run(code, tmp_path)
    finally:
        asyncio.run(_delete_stream(url, name))
    assert sorted(printed) == sorted(line.replace("orders", name) for line in expected)


async def _delete_stream(url: str, name: str) -> None:
    transport = await connect(url)
    try:
        await transport.delete_stream(name)
    finally:
        await transport.close()
