"""`kvmsplit prove`: the Z3 queries as a table, with exit codes 0 proved, 1 refuted, 3 unknown.

The command is tested against fake queries (the contract of
kvmsplit.properties.smt: QUERIES, run_query(), write_regression_test()),
and once against a real query and the mutant it refutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.cli.helpers import invoke


@attrs.frozen
class FakeQuery:
    name: str
    proves: str
    scope: str = "one SPTE"
    mutant: str | None = None


@attrs.frozen
class FakeResult:
    name: str
    status: str
    seconds: float
    counterexample: dict[str, int] | None = None
    detail: str = ""


OUTCOMES = {
    "lemma_a": FakeResult("lemma_a", "proved", 0.003),
    "lemma_b": FakeResult("lemma_b", "refuted", 0.004, {"huge_spte": 0x8000000000100BF7, "index": 3}),
    "lemma_c": FakeResult("lemma_c", "unknown", 30.0, None, "timeout"),
}


@pytest.fixture
def fake_smt(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, str]]:
    import kvmsplit.properties.smt as smt

    calls: list[tuple[str, float, str]] = []

    def run_query(name: str, timeout_s: float = 30.0, model: str = "merged") -> FakeResult:
        calls.append((name, timeout_s, model))
        return OUTCOMES[name]

    def write_regression_test(result: FakeResult, path: Any) -> Path:
        Path(path).write_text(f"# regression test for {result.name}\n")
        return Path(path)

    monkeypatch.setattr(smt, "QUERIES", {n: FakeQuery(n, f"{n} holds") for n in OUTCOMES}, raising=False)
    monkeypatch.setattr(smt, "run_query", run_query, raising=False)
    monkeypatch.setattr(smt, "write_regression_test", write_regression_test, raising=False)
    return calls


def test_prove_exits_0_when_every_query_is_proved(fake_smt: list[Any]) -> None:
    result = invoke("prove", "lemma_a", "--timeout", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["query", "result", "time"]
    assert lines[1].split()[:2] == ["lemma_a", "proved"]
    assert fake_smt == [("lemma_a", 5.0, "merged")]


def test_prove_exits_1_on_a_refutation_and_prints_the_values(fake_smt: list[Any]) -> None:
    result = invoke("prove", "lemma_a", "lemma_b", "--model", "v3")
    assert result.exit_code == 1
    assert "lemma_b" in result.stdout and "refuted" in result.stdout
    assert "huge_spte = 0x8000000000100bf7" in result.stdout
    assert "    index = 3" in result.stdout
    assert [c[2] for c in fake_smt] == ["v3", "v3"]


def test_prove_exits_3_when_a_query_is_unknown(fake_smt: list[Any]) -> None:
    result = invoke("prove", "lemma_a", "lemma_c")
    assert result.exit_code == 3
    assert "unknown" in result.stdout and "timeout" in result.stdout
    assert "1 proved, 0 refuted, 1 unknown" in result.stdout


def test_prove_reports_a_refutation_over_an_unknown(fake_smt: list[Any]) -> None:
    assert invoke("prove").exit_code == 1
    assert [c[0] for c in fake_smt] == list(OUTCOMES)


def test_prove_writes_a_regression_test_for_each_refuted_query(fake_smt: list[Any], tmp_path: Path) -> None:
    result = invoke("prove", "lemma_a", "lemma_b", "--write-test", str(tmp_path / "t"))
    assert result.exit_code == 1
    written = tmp_path / "t" / "test_smt_lemma_b.py"
    assert written.read_text() == "# regression test for lemma_b\n"
    assert f"wrote {written}" in result.stdout
    assert not (tmp_path / "t" / "test_smt_lemma_a.py").exists()


def test_prove_of_an_unknown_query_exits_2_naming_it(fake_smt: list[Any]) -> None:
    result = invoke("prove", "lemma_z")
    assert result.exit_code == 2
    assert "no query named 'lemma_z'" in result.stderr
    assert fake_smt == []


def test_prove_with_an_unknown_model_or_bad_timeout_exits_2(fake_smt: list[Any]) -> None:
    assert invoke("prove", "--model", "mutants/nope").exit_code == 2
    assert invoke("prove", "--timeout", "0").exit_code == 2


def test_prove_exits_3_when_there_are_no_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmsplit.properties.smt as smt

    monkeypatch.setattr(smt, "QUERIES", {}, raising=False)
    result = invoke("prove")
    assert result.exit_code == 3
    assert "no Z3 queries" in result.stderr


def test_prove_list_prints_what_each_query_proves(fake_smt: list[Any]) -> None:
    result = invoke("prove", "--list")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"{n}: {n} holds" for n in OUTCOMES]
    assert fake_smt == []


def test_prove_refutes_a_real_query_on_the_mutant_that_breaks_it(tmp_path: Path) -> None:
    import kvmsplit.properties.smt as smt

    queries = getattr(smt, "QUERIES", {})
    name = "split_child_ps_matches_level"
    if name not in queries:
        pytest.fail(f"the Z3 query {name} is missing from kvmsplit.properties.smt.QUERIES")
    assert invoke("prove", name, "--timeout", "20").exit_code == 0
    result = invoke("prove", name, "--model", "mutants/split_keeps_ps_at_4k", "--write-test", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert " = 0x" in result.stdout or " = " in result.stdout
    assert (tmp_path / f"test_smt_{name}.py").is_file()
