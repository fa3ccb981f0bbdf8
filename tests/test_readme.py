"""The README's examples are executed, so they cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_first_block_holds_exactly_the_two_setup_commands() -> None:
    first = re.search(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/run", "bash scripts/test"]


def test_python_examples_run(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert blocks, "the README should show Python usage"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "PubAck(stream='orders'" in result.stdout
        assert "orders.created" in result.stdout
