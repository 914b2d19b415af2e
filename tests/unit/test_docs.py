"""The trace example in docs/trace-format.md parses and replays with its expectations met."""

import re
from pathlib import Path

from kvmsplit.trace import load_trace, run_trace

DOC = Path(__file__).resolve().parents[2] / "docs" / "trace-format.md"


def test_documented_trace_example_replays() -> None:
    text = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert text is not None
    cfg, ops = load_trace(text.group(1), str(DOC))
    result = run_trace(cfg, ops)
    assert result.ok, result.failure
    assert any(op["op"] == "expect" for op in ops)


def test_invariants_doc_matches_the_registry() -> None:
    from click.testing import CliRunner

    from kvmsplit.cli import main

    table = CliRunner().invoke(main, ["invariants", "--markdown"]).output
    doc = (DOC.parent / "invariants.md").read_text()
    assert table.strip() in doc, "regenerate docs/invariants.md with `kvmsplit invariants --markdown`"
