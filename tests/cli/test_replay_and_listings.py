"""`kvmsplit replay`, `scenario`, `scenarios`, `models` and `selftest`."""

from __future__ import annotations

import json
from pathlib import Path

from kvmsplit.properties import invariants as _registers  # noqa: F401
from kvmsplit.properties.registry import INVARIANTS

from kvmsplit.models_registry import list_models
from kvmsplit.scenarios import SCENARIOS
from tests.cli.helpers import GOOD_OPS, LOGGING_ON, RUN_2M, SLOT_0, invoke, write_trace


def test_replay_checks_every_invariant_after_every_step_and_prints_page_stats(tmp_path: Path) -> None:
    result = invoke("replay", write_trace(tmp_path, GOOD_OPS))
    assert result.exit_code == 0, result.output
    assert f"4 operations; {len(INVARIANTS)} invariants checked 4 times after operations" in result.stdout
    assert "all invariants held; page stats:" in result.stdout
    assert "  pages_4k                   1024" in result.stdout


def test_replay_json_is_machine_readable(tmp_path: Path) -> None:
    result = invoke("replay", write_trace(tmp_path, GOOD_OPS), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["steps"] == 4 and doc["step_checks"] == 4
    assert doc["invariants"] == len(INVARIANTS) and doc["unlock_checks"] > 0
    assert doc["stats"]["pages_4k"] == 1024 and doc["stats"]["pages_2m"] == 0
    assert doc["failure_kind"] is None and doc["failed_op"] is None


def test_replay_of_a_failing_trace_names_the_step_and_stops_there(tmp_path: Path) -> None:
    ops = [SLOT_0, RUN_2M, {"op": "expect", "pages_2m": 3}, LOGGING_ON]
    result = invoke("replay", write_trace(tmp_path, ops), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["failed_step"] == 2 and doc["steps"] == 3
    assert doc["failure_kind"] == "invariant" and doc["failure_name"] == "scenario_expectation"
    assert doc["failed_op"] == {"op": "expect", "pages_2m": 3}
    assert doc["stats"]["pages_2m"] == 2


def test_replay_of_a_crashing_model_exits_1_with_the_position(tmp_path: Path) -> None:
    model = tmp_path / "crash.py"
    model.write_text(
        "from kvmsplit.split import MergedSplit\n\n\nclass C(MergedSplit):\n"
        "    def kvm_mmu_slot_try_split_huge_pages(self, *a, **k):\n        raise ValueError('boom')\n\n\n"
        "MODEL = C()\n"
    )
    result = invoke("replay", write_trace(tmp_path, GOOD_OPS), "--model", str(model))
    assert result.exit_code == 1, result.output
    assert "operation 2 (kvm_set_user_memory_region): the model crashed: ValueError: boom" in result.stderr


def test_scenarios_and_models_print_one_name_a_line() -> None:
    assert invoke("scenarios").stdout.splitlines() == list(SCENARIOS)
    models = invoke("models").stdout.splitlines()
    assert models == list_models() and models[:2] == ["merged", "v3"]
    assert "mutants/split_no_rmap" in models


def test_scenario_runs_one_builtin_scenario() -> None:
    name = next(iter(SCENARIOS))
    result = invoke("scenario", name)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"scenario {name} (model ")


def test_selftest_writes_a_kvm_selftest_skeleton(tmp_path: Path) -> None:
    ops = [SLOT_0, RUN_2M, LOGGING_ON, {"op": "kvm_get_dirty_log", "slot": 0}]
    out = tmp_path / "t.c"
    result = invoke("selftest", write_trace(tmp_path, ops), "-o", str(out))
    assert result.exit_code == 0, result.output
    c = out.read_text()
    assert c.startswith("// SPDX-License-Identifier: GPL-2.0-only")
    assert '#include "kvm_util.h"' in c
    assert "vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS_THP, TEST_GPA(0x0), TEST_SLOT(0), 0x400, 0);" in c
    assert "vm_mem_region_set_flags(vm, TEST_SLOT(0), KVM_MEM_LOG_DIRTY_PAGES);" in c
    assert "kvm_vm_get_dirty_log(vm, TEST_SLOT(0), bitmap);" in c
    # The model's page stats after the fault and after eager splitting.
    assert 'assert_page_stats(vm, 0, 2, 0, "operation 1");' in c
    assert 'assert_page_stats(vm, 1024, 0, 0, "operation 2");' in c
    assert c.count("{") == c.count("}")
    assert c.rstrip().endswith("}")


def test_selftest_of_a_failing_trace_marks_the_failing_operation(tmp_path: Path) -> None:
    ops = [SLOT_0, RUN_2M, {"op": "expect", "pages_2m": 3}]
    result = invoke("selftest", write_trace(tmp_path, ops))
    assert result.exit_code == 0
    assert "/* The reference model fails here: invariant scenario_expectation violated" in result.stdout
    assert "TEST_ASSERT_EQ(vm_get_stat(vm, pages_2m), 3);" in result.stdout


def test_selftest_translates_clears_moves_and_caps(tmp_path: Path) -> None:
    ops = [
        {"op": "kvm_enable_cap_manual_dirty_log_protect", "flags": 3},
        SLOT_0 | {"gpa": 0x200000, "hva": SLOT_0["hva"]},
        LOGGING_ON | {"gpa": 0x200000},
        {"op": "kvm_clear_dirty_log", "slot": 0, "first_page": 64, "num_pages": 64, "gfns": [0x200 + 64 + 3]},
        LOGGING_ON | {"gpa": 0x800000},
    ]
    result = invoke("selftest", write_trace(tmp_path, ops))
    assert result.exit_code == 0, result.output
    c = result.stdout
    assert "vm_enable_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3);" in c
    assert "\t__set_bit(3, bitmap);\t/* gfn 0x243 */" in c
    assert "kvm_vm_clear_dirty_log(vm, TEST_SLOT(0), bitmap, 0x40, 64);" in c
    assert "vm_mem_region_move(vm, TEST_SLOT(0), TEST_GPA(0x800000));" in c
