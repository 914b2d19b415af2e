"""`kvmsplit check`: the state machines as a command, findings saved as reproducers.

A mutant the state machine catches exits 1 with the invariant, the shrunk
trace and the page stats, and leaves a JSON trace that replays to the same
failure at the same step and a pytest file that fails with the same
invariant.  One MMU configuration per run keeps these tests short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from kvmsplit.properties import invariants as _registers  # noqa: F401
from kvmsplit.properties.registry import INVARIANTS

from kvmsplit.trace import load_trace, run_trace
from tests.cli.helpers import invoke

MUTANT = "mutants/split_no_rmap"
CAUGHT_BY = "rmap_holds_exactly_present_leaves"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mutant_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("check")
    result = invoke(
        "check",
        "--model",
        MUTANT,
        "--mmu",
        "tdp",
        "--out",
        str(out / "failures"),
        "--json",
        str(out / "summary.json"),
        "--junit",
        str(out / "junit.xml"),
        "--selftest",
    )
    summary = json.loads((out / "summary.json").read_text())
    return {"result": result, "out": out, "summary": summary, "machine": summary["machines"][0]}


def test_check_on_a_caught_mutant_exits_1_naming_the_invariant_and_its_statement(mutant_run: dict[str, Any]) -> None:
    result = mutant_run["result"]
    assert result.exit_code == 1, result.output
    assert f"invariant {CAUGHT_BY}: {INVARIANTS[CAUGHT_BY].statement}" in result.stdout
    assert f"relied on by {INVARIANTS[CAUGHT_BY].kernel}" in result.stdout
    assert "1 machine(s): 0 passed, 1 failed" in result.stdout


def test_check_prints_the_shrunk_trace_in_kernel_vocabulary_and_the_page_stats(mutant_run: dict[str, Any]) -> None:
    out = mutant_run["result"].stdout
    machine = mutant_run["machine"]
    step = machine["failure"]["step"]
    assert f"shrunk trace ({machine['failure']['operations']} operations" in out
    assert "KVM_SET_USER_MEMORY_REGION slot 0" in out
    failing = [line for line in out.splitlines() if line.endswith("<-- fails here")]
    assert len(failing) == 1 and failing[0].split()[0] == str(step)
    assert f"state at operation {step} (page stats):" in out
    assert "  pages_4k " in out and "  n_used_mmu_pages " in out


def test_the_saved_trace_replays_to_the_same_failure_at_the_same_step(mutant_run: dict[str, Any]) -> None:
    machine = mutant_run["machine"]
    path = machine["files"]["trace"]
    cfg, ops = load_trace(Path(path).read_text(), path)
    assert cfg.model == MUTANT
    assert len(ops) == machine["failure"]["operations"]
    replay = run_trace(cfg, ops)
    assert replay.failed_step == machine["failure"]["step"]
    assert str(replay.failure) == machine["failure"]["message"]
    assert getattr(replay.failure, "name", None) == CAUGHT_BY
    assert machine["failure"]["reproduced"] is True


def test_kvmsplit_replay_of_the_saved_trace_fails_at_the_same_step(mutant_run: dict[str, Any]) -> None:
    machine = mutant_run["machine"]
    result = invoke("replay", machine["files"]["trace"], "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["failed_step"] == machine["failure"]["step"]
    assert doc["failure"] == machine["failure"]["message"]
    assert doc["failure_name"] == CAUGHT_BY


def test_the_written_pytest_file_fails_with_the_invariant_without_hypothesis(mutant_run: dict[str, Any]) -> None:
    path = Path(mutant_run["machine"]["files"]["pytest"])
    source = path.read_text()
    assert "hypothesis" not in source.lower().replace("no hypothesis", "")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout
    assert f"invariant {CAUGHT_BY} violated" in proc.stdout


def test_the_written_pytest_file_passes_on_the_merged_model(mutant_run: dict[str, Any]) -> None:
    path = Path(mutant_run["machine"]["files"]["pytest"])
    env = dict(os.environ, PYTHONPATH=str(REPO), KVMSPLIT_MODEL="merged")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_check_prints_the_paths_of_the_reproducers_it_wrote(mutant_run: dict[str, Any]) -> None:
    files = mutant_run["machine"]["files"]
    assert set(files) == {"trace", "pytest", "selftest"}
    for path in files.values():
        assert Path(path).is_file()
        assert path in mutant_run["result"].stdout
    assert Path(files["pytest"]).name.startswith("test_")
    assert "vm_userspace_mem_region_add" in Path(files["selftest"]).read_text()


def test_check_json_summary_describes_the_finding(mutant_run: dict[str, Any]) -> None:
    summary = mutant_run["summary"]
    assert summary["command"] == "check" and summary["exit_code"] == 1
    assert summary["model"] == MUTANT and summary["mmus"] == ["tdp"] and summary["profile"] == "ci"
    machine = mutant_run["machine"]
    assert machine["status"] == "failed" and machine["mmu"] == "tdp"
    assert machine["failure"]["kind"] == "invariant" and machine["failure"]["name"] == CAUGHT_BY
    assert machine["examples"] >= 1 and machine["steps"] >= machine["failure"]["operations"]
    assert machine["failure"]["op"]["op"] == "kvm_set_user_memory_region"


def test_check_junit_has_one_failing_testcase_per_machine(mutant_run: dict[str, Any]) -> None:
    root = ET.parse(mutant_run["out"] / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "1" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["machine[tdp]"]
    failure = cases[0].find("failure")
    assert failure is not None and CAUGHT_BY in (failure.get("message") or "")


def test_check_on_merged_exits_0_with_plain_progress_lines(tmp_path: Path) -> None:
    junit, summary = tmp_path / "j.xml", tmp_path / "s.json"
    result = invoke(
        "check", "--mmu", "shadow", "--max-examples", "3", "--junit", str(junit), "--json", str(summary), "--out",
        str(tmp_path / "f"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kvmsplit check: model merged, profile ci (3 examples")
    assert "shadow: running up to 3 examples" in lines
    assert any(line.startswith("shadow: passed: ") and " steps, " in line for line in lines)
    assert "1 machine(s): 1 passed, 0 failed" in result.stdout
    assert not (tmp_path / "f").exists()
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    case = suite.find("testcase")
    assert case is not None and case.find("failure") is None
    doc = json.loads(summary.read_text())
    assert doc["exit_code"] == 0 and doc["machines"][0]["status"] == "passed"
    assert doc["machines"][0]["examples"] >= 3


def test_check_with_a_seed_is_reproducible(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        path = tmp_path / f"s{i}.json"
        result = invoke("check", "--mmu", "shadow", "--max-examples", "3", "--seed", "7", "--json", str(path))
        assert result.exit_code == 0, result.output
        runs.append(json.loads(path.read_text())["machines"][0])
    assert runs[0]["steps"] == runs[1]["steps"] and runs[0]["events"] == runs[1]["events"]


def test_check_exits_3_when_hypothesis_gives_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmsplit.check

    def gave_up(mmu: str, model: str, *args: Any, **kwargs: Any) -> Any:
        return kvmsplit.check.MachineRun(mmu=mmu, model=model, status="error", error="Unsatisfiable: no examples")

    monkeypatch.setattr(kvmsplit.check, "run_machine", gave_up)
    result = invoke("check", "--mmu", "tdp")
    assert result.exit_code == 3
    assert "no verdict (Unsatisfiable: no examples)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "mutants/nonexistent"), "no model named 'mutants/nonexistent'"),
        (("--model", "missing_model.py"), "model file 'missing_model.py' does not exist"),
        (("--mmu", "ept"), "Invalid value for '--mmu'"),
        (("--profile", "fast"), "Invalid value for '--profile'"),
        (("--max-examples", "0"), "Invalid value for '--max-examples'"),
        (("--seed", "x"), "Invalid value for '--seed'"),
    ],
)
def test_check_with_bad_usage_exits_2_naming_the_problem(args: tuple[str, ...], message: str) -> None:
    result = invoke("check", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_check_accepts_a_model_given_as_a_path(tmp_path: Path) -> None:
    model = tmp_path / "crashing_model.py"
    model.write_text(
        "from kvmsplit.split import MergedSplit\n\n\n"
        "class Crashing(MergedSplit):\n"
        "    def shadow_mmu_try_split_huge_page(self, kvm, slot, huge_sptep):\n"
        "        raise RuntimeError('model bug')\n\n\n"
        "MODEL = Crashing()\n"
    )
    result = invoke("check", "--model", str(model), "--mmu", "tdp", "--out", str(tmp_path / "f"))
    assert result.exit_code == 1, result.output
    assert "the model crashed: RuntimeError" in result.stdout
    assert list((tmp_path / "f").glob("test_*.py"))


def test_check_on_a_terminal_shows_a_live_progress_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    result = invoke("check", "--mmu", "tdp", "--max-examples", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "tdp: running up to" not in out  # not the plain lines
    assert "3/3 ex" in out and " steps" in out and "passed" in out
    assert "rare " in out and "/9: " in out


def test_check_reports_a_mirrored_kernel_warn_by_its_site(tmp_path: Path) -> None:
    model = tmp_path / "warning_model.py"
    model.write_text(
        "from kvmsplit.errors import kvm_bug_on\n"
        "from kvmsplit.split import MergedSplit\n\n\n"
        "class Warns(MergedSplit):\n"
        "    def kvm_mmu_slot_try_split_huge_pages(self, kvm, slot, target_level):\n"
        "        kvm_bug_on(True, 'kvm_mmu_slot_try_split_huge_pages', 'split with mmu_lock not held')\n\n\n"
        "MODEL = Warns()\n"
    )
    summary = tmp_path / "s.json"
    result = invoke(
        "check", "--model", str(model), "--mmu", "tdp", "--out", str(tmp_path / "f"), "--json", str(summary)
    )
    assert result.exit_code == 1, result.output
    assert "kernel WARN mirrored in kvm_mmu_slot_try_split_huge_pages()" in result.stdout
    failure = json.loads(summary.read_text())["machines"][0]["failure"]
    assert failure["kind"] == "kvm_bug_on" and failure["name"] == "kvm_mmu_slot_try_split_huge_pages"
    assert failure["reproduced"] is True
