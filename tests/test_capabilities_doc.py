"""docs/capabilities.md is generated from the declared flags: it must not drift from them."""

from pathlib import Path

from pigeon.transport.matrix import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "capabilities.md"


def test_capabilities_doc_matches_the_declared_flags() -> None:
    assert DOC.read_text() == render(), (
        "docs/capabilities.md is stale: run `python -m pigeon.transport.matrix > docs/capabilities.md`"
    )
