"""Unit tests for kvmsplit/cli.py (the kvmsplit command).

Exit codes: 0 everything held, 1 a finding (invariant, mirrored WARN or
unmet expectation), 2 bad usage or bad input, with the error on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from kvmsplit.cli import main
from kvmsplit.models_registry import list_models
from kvmsplit.scenarios import DEFAULT_SCENARIO, SCENARIOS
from kvmsplit.trace import TraceConfig, dump_trace

MiB = 1 << 20
HVA = 0x7F00_0000_0000

GOOD_OPS: list[dict[str, Any]] = [
    {"op": "kvm_set_user_memory_region", "slot": 0, "gpa": 0, "size": 4 * MiB, "hva": HVA, "backing": "thp"},
    {"op": "kvm_vcpu_run", "start": 0, "end": 4 * MiB, "stride": 2 * MiB, "access": "write"},
    {"op": "expect", "pages_2m": 2, "pages_4k": 0},
]
FAILING_OPS: list[dict[str, Any]] = [*GOOD_OPS[:2], {"op": "expect", "pages_2m": 5}, GOOD_OPS[1]]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _trace(tmp_path: Path, ops: list[dict[str, Any]], name: str = "trace.json") -> str:
    path = tmp_path / name
    path.write_text(dump_trace(TraceConfig(mmu="tdp"), ops))
    return str(path)


# --- Listings. -------------------------------------------------------------------------------


def test_scenarios_prints_one_name_a_line() -> None:
    result = invoke("scenarios")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == list(SCENARIOS)
    assert DEFAULT_SCENARIO in result.stdout.splitlines()


def test_models_prints_one_name_a_line_merged_first_then_v3() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines == list_models()
    assert lines[:2] == ["merged", "v3"]


# --- scenario. ---------------------------------------------------------------------------------


def test_scenario_without_a_name_runs_the_default_and_prints_page_stats() -> None:
    result = invoke("scenario")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"scenario {DEFAULT_SCENARIO} (model merged):")
    assert "all invariants held; page stats:" in out
    for stat in ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush_requests", "n_used_mmu_pages"):
        assert f"  {stat} " in out


def test_scenario_with_an_unknown_name_exits_2_naming_it() -> None:
    result = invoke("scenario", "NOPE")
    assert result.exit_code == 2
    assert "no scenario named 'NOPE'" in result.stderr
    assert result.stdout == ""


def test_scenario_with_an_unknown_model_exits_2_naming_it() -> None:
    result = invoke("scenario", "dirty_log_lazy_split", "--model", "mutants/nonexistent")
    assert result.exit_code == 2
    assert "mutants/nonexistent" in result.stderr


def test_scenario_runs_on_the_model_asked_for() -> None:
    result = invoke("scenario", "dirty_log_lazy_split", "--model", "v3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("scenario dirty_log_lazy_split (model v3):")


def test_scenario_json_output_parses_and_reports_the_run() -> None:
    result = invoke("scenario", "dirty_log_lazy_split", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["failed_step"] is None and doc["failure"] is None
    assert doc["config"]["mmu"] == "tdp-legacy"
    assert doc["stats"]["pages_2m"] == 3 and doc["stats"]["pages_4k"] == 1
    assert "n_used_mmu_pages" in doc["stats"]


# --- replay. -------------------------------------------------------------------------------------


def test_replay_of_a_good_trace_exits_0(tmp_path: Path) -> None:
    path = _trace(tmp_path, GOOD_OPS)
    result = invoke("replay", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"trace {path} (model merged)")
    assert "all invariants held" in result.stdout


def test_replay_of_a_trace_whose_expectation_fails_exits_1_naming_the_step(tmp_path: Path) -> None:
    result = invoke("replay", _trace(tmp_path, FAILING_OPS))
    assert result.exit_code == 1
    out = result.stdout
    assert 'FAILED at step 2: {"op": "expect", "pages_2m": 5}' in out
    assert "invariant scenario_expectation" in out
    assert "pages_2m is 2, the scenario expects 5" in out
    assert "page stats at the failure:" in out


def test_replay_json_of_a_failing_trace_parses_and_names_the_step(tmp_path: Path) -> None:
    result = invoke("replay", _trace(tmp_path, FAILING_OPS), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert doc["failed_step"] == 2
    assert doc["steps"] == 3
    assert "scenario_expectation" in doc["failure"]


def test_replay_of_malformed_json_exits_2_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "kvmsplit-trace", "version": 1, "ops": [')
    result = invoke("replay", str(path))
    assert result.exit_code == 2
    assert f"{path}: not valid JSON" in result.stderr
    assert result.stdout == ""


def test_replay_of_an_unknown_operation_exits_2_naming_the_file_and_operation(tmp_path: Path) -> None:
    path = _trace(tmp_path, [*GOOD_OPS, {"op": "kvm_frobnicate"}], "unknown.json")
    result = invoke("replay", path)
    assert result.exit_code == 2
    assert "operation 3: unknown operation 'kvm_frobnicate'" in result.stderr
    assert result.stdout == ""


def test_replay_of_a_trace_with_a_wrong_version_exits_2_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "v2.json"
    path.write_text(json.dumps({"format": "kvmsplit-trace", "version": 2, "ops": []}))
    result = invoke("replay", str(path))
    assert result.exit_code == 2
    assert f"{path}: trace version 2 is not supported" in result.stderr


def test_replay_of_a_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    result = invoke("replay", str(path))
    assert result.exit_code == 2
    assert str(path) in result.stderr


def test_replay_of_an_operation_the_model_rejects_exits_2(tmp_path: Path) -> None:
    """Bad input found while running (a vCPU that does not exist) is usage, not a finding."""
    path = _trace(tmp_path, [*GOOD_OPS, {"op": "kvm_vcpu_access", "vcpu": 3, "addr": 0}])
    result = invoke("replay", path)
    assert result.exit_code == 2
    assert "vcpu 3 does not exist" in result.stderr


def test_replay_with_a_model_override_runs_that_model(tmp_path: Path) -> None:
    path = _trace(tmp_path, GOOD_OPS)
    result = invoke("replay", path, "--model", "v3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"trace {path} (model v3)")


# --- compare. -----------------------------------------------------------------------------------


def test_compare_dirty_log_lazy_split_exits_0_with_both_models_ok() -> None:
    result = invoke("compare", "dirty_log_lazy_split")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "dirty_log_lazy_split"
    assert "  merged: ok" in lines
    assert "  v3: ok" in lines


@pytest.mark.parametrize("args", [("compare", "NOPE"), ("compare", "dirty_log_lazy_split", "--models", "merged,nope")])
def test_compare_with_an_unknown_scenario_or_model_exits_2(args: tuple[str, ...]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "nope" in result.stderr.lower()
