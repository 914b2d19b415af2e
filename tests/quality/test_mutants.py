"""Every mutant is caught: a green run of the harness means something.

Three checks, all under the ci profile:
- every invariant names a mutant, and that mutant's stated shortest trace
  passes on the faithful model and fails on the mutant with that invariant
  alone checked (an earlier invariant of a full check may see the bug first);
- the state machine finds every mutant and shrinks it to at most its
  stated length plus two steps: 19 from its own setup draws, the other 8
  with every test case starting from the focus of the stated trace;
- directed tests through the Python API, beside the faithful model, for the
  split details (reuse, the guard, exec under NX) the traces build up to.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from kvmsplit.properties import invariants as _registers_invariants  # noqa: F401
from kvmsplit.properties.registry import INVARIANTS

from kvmsplit import shadow_mmu, x86
from kvmsplit.checker import Checker
from kvmsplit.errors import InvariantViolation, KvmBugOn
from kvmsplit.kvm import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MIN_FREE_MMU_PAGES
from kvmsplit.machine import machine_for
from kvmsplit.models_registry import list_models, load_model, model_module
from kvmsplit.spte import PG_LEVEL_1G, PG_LEVEL_2M
from tests.helpers import EptBuilder, GiB, MiB, add_slot, new_vm, run, set_logging

INIT_SET = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
MUTANTS = sorted(m for m in list_models() if m.startswith("mutants/"))

# Mutant -> its own invariant: the one whose @invariant(mutant=...) names it.
CAUGHT_BY = {inv.mutant: inv.name for inv in INVARIANTS.values() if inv.mutant}

CI_SHRINK = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def test_every_invariant_names_a_mutant_and_every_mutant_is_named() -> None:
    for inv in INVARIANTS.values():
        assert inv.mutant in MUTANTS, f"{inv.name} names no existing mutant: {inv.mutant!r}"
    assert set(CAUGHT_BY) == set(MUTANTS)
    for name in MUTANTS:
        mod = model_module(name)
        assert (mod.__doc__ or "").strip() and isinstance(mod.SHORTEST_TRACE, int)


# Mutant -> (MMU configuration, setup draws, the machine rules after setup)
# of its stated shortest trace: setup plus these rules is SHORTEST_TRACE steps.
STATED_TRACES: dict[str, tuple[str, dict[str, Any], list[tuple[str, tuple[Any, ...]]]]] = {
    "mutants/split_allows_unsync_owner": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_keeps_ps_at_4k": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_no_parent_pte": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_no_rmap": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_pfn_offset_wrong_level": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_child_indirect": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_exec_at_2m": (
        "tdp",
        {"nx": True, "focus": "clear"},
        [("kvm_clear_dirty_log", (2, 0, [0]))],
    ),
    "mutants/split_guard_lt": (
        "tdp",
        {"plan": (0, 0, 0, "none", KVM_MIN_FREE_MMU_PAGES)},
        [("kvm_mmu_slot_apply_flags", ())],
    ),
    "mutants/split_stats_reused_as_fresh": ("tdp", {"focus": "alias"}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_always_allocates": ("tdp", {"focus": "alias"}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/unmap_keeps_page_stats": ("tdp", {}, [("kvm_mmu_notifier", (0, "dontneed"))]),
    "mutants/split_levels_ascending": ("tdp", {"focus": "clear"}, [("kvm_clear_dirty_log", (2, 0, [0]))]),
    "mutants/split_no_flush_on_nonleaf_reuse": (
        "tdp",
        {"focus": "alias_1g"},
        [("kvm_clear_dirty_log", (2, 0, [0]))],
    ),
    "mutants/split_page_tracked_for_nx_recovery": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_child_drops_host_writable": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/split_link_not_executable": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/tdp_zap_leaves_frozen": (
        "tdp",
        {},
        [("kvm_mmu_slot_apply_flags", ()), ("kvm_mmu_slot_apply_flags_stop", (0,))],
    ),
    "mutants/wrprot_skips_unsplit_huge": ("tdp", {"plan": (0, 0, 1, "none", 0)}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/fast_pf_no_mark_dirty": (
        "tdp",
        {},
        [("kvm_mmu_slot_apply_flags", ()), ("kvm_vcpu_run", (0, 0, "write"))],
    ),
    "mutants/tdp_split_child_gfn_unaligned": ("tdp", {"focus": "clear"}, [("kvm_clear_dirty_log", (0, 1, [0]))]),
    "mutants/split_child_role_drops_guest_mode": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/unsync_child_bit_not_cleared": ("shadow", {"focus": "unsync"}, [("kvm_guest_tlb_flush", (0,))]),
    "mutants/account_shadowed_no_write_track": ("shadow", {}, []),
    "mutants/split_sp_not_accounted": ("tdp", {}, [("kvm_mmu_slot_apply_flags", ())]),
    "mutants/commit_zap_leaks_page": ("tdp", {"focus": "unsync", "plan": (0, 0, 0, "none", 4)}, []),
    "mutants/notifier_no_flush": ("tdp", {}, [("kvm_mmu_notifier", (0, "dontneed"))]),
    "mutants/get_dirty_log_no_flush": (
        "tdp",
        {},
        [("kvm_mmu_slot_apply_flags", ()), ("kvm_vcpu_run", (0, 0, "write")), ("kvm_get_dirty_log", (0,))],
    ),
}
NO_PLAN = (0, 0, 0, "none", 0)


def run_stated_trace(mmu: str, model: str, draws: dict[str, Any], rules, invariants=None) -> None:  # type: ignore[no-untyped-def]
    state = machine_for(mmu, model, invariants)()
    try:
        setup = {"initially_set": False, "no_eager": False, "nx": False, "plan": NO_PLAN} | draws
        state.setup(**setup)
        for rule, args in rules:
            getattr(state, rule)(*args)
    finally:
        state.teardown()


def test_every_mutant_has_a_stated_trace() -> None:
    assert set(STATED_TRACES) == set(MUTANTS)


@pytest.mark.parametrize("name", sorted(STATED_TRACES))
def test_stated_trace_passes_merged_and_its_invariant_alone_catches_the_mutant(name: str) -> None:
    mmu, draws, rules = STATED_TRACES[name]
    assert 1 + len(rules) == model_module(name).SHORTEST_TRACE
    run_stated_trace(mmu, "merged", draws, rules)
    with pytest.raises(InvariantViolation) as excinfo:
        run_stated_trace(mmu, name, draws, rules, (CAUGHT_BY[name],))
    assert excinfo.value.name == CAUGHT_BY[name]


# Mutant -> the configuration where the ci-profile machine finds it by itself,
# and whether with every invariant checked or its own alone.  Which mutants
# the derandomized ci runs reach shifts with any change to the generator;
# benchmarks/bench_machine.py reports all of them, and the stated traces
# above catch every one whatever the generator draws.
MACHINE_FINDS = {
    "mutants/account_shadowed_no_write_track": ("tdp", "all"),
    "mutants/commit_zap_leaks_page": ("tdp", "all"),
    "mutants/notifier_no_flush": ("tdp", "all"),
    "mutants/split_allows_unsync_owner": ("tdp", "all"),
    "mutants/split_child_drops_host_writable": ("tdp", "all"),
    "mutants/split_child_indirect": ("tdp", "all"),
    "mutants/split_child_role_drops_guest_mode": ("tdp", "all"),
    "mutants/split_keeps_ps_at_4k": ("tdp", "all"),
    "mutants/split_levels_ascending": ("tdp", "all"),
    "mutants/split_link_not_executable": ("tdp", "all"),
    "mutants/split_no_parent_pte": ("tdp", "all"),
    "mutants/split_no_rmap": ("tdp", "all"),
    "mutants/split_page_tracked_for_nx_recovery": ("tdp", "all"),
    "mutants/split_pfn_offset_wrong_level": ("tdp", "all"),
    "mutants/split_sp_not_accounted": ("tdp", "all"),
    "mutants/tdp_split_child_gfn_unaligned": ("tdp", "all"),
    "mutants/unmap_keeps_page_stats": ("tdp", "all"),
    "mutants/unsync_child_bit_not_cleared": ("tdp", "all"),
    "mutants/wrprot_skips_unsplit_huge": ("tdp", "all"),
}


@pytest.mark.parametrize("name", sorted(MACHINE_FINDS))
def test_state_machine_finds_the_mutant_and_shrinks_it(name: str) -> None:
    mmu, checked = MACHINE_FINDS[name]
    machine = machine_for(mmu, name, None if checked == "all" else (CAUGHT_BY[name],))
    with pytest.raises((InvariantViolation, KvmBugOn)) as excinfo:
        run_state_machine_as_test(machine, settings=CI_SHRINK)
    if checked == "alone":
        assert excinfo.value.name == CAUGHT_BY[name]
    notes = "\n".join(getattr(excinfo.value, "__notes__", []))
    steps = [line for line in notes.splitlines() if line.strip().startswith("state.") and "teardown" not in line]
    assert steps, notes
    assert len(steps) <= model_module(name).SHORTEST_TRACE + 2, notes


def holds_for_merged_and_catches_the_mutant(model: str, step) -> None:  # type: ignore[no-untyped-def]
    """Run @step: the faithful model passes, the mutant fails its named invariant."""
    if model == "merged":
        step()
        return
    with pytest.raises(InvariantViolation) as excinfo:
        step()
    # The transition check runs inside the split, before any later check.
    assert excinfo.value.name in (CAUGHT_BY[model], "split_keeps_gfn_to_pfn_mapping")


def with_model(kvm, name: str):  # type: ignore[no-untyped-def]
    kvm.model_split_policy = load_model(name)
    return kvm


@pytest.mark.parametrize("model", ["merged", "mutants/split_exec_at_2m"])
def test_exec_at_2m_is_caught_after_a_1g_split_under_nx(model: str) -> None:
    kvm, checker = new_vm("tdp", nx_huge_pages=True)
    with_model(kvm, model)
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, INIT_SET)
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    run(kvm, checker, 0, GiB, GiB + 1, 4096)
    set_logging(kvm, 0, True)

    def clear_and_check() -> None:
        x86.kvm_clear_dirty_log(kvm, 0, 0, 64, (1).to_bytes(8, "little"))
        checker.after_operation()

    holds_for_merged_and_catches_the_mutant(model, clear_and_check)


@pytest.mark.parametrize("model", ["merged", "mutants/split_guard_lt"])
def test_guard_lt_is_caught_at_exactly_min_free_pages(model: str) -> None:
    kvm, checker = new_vm("tdp")
    with_model(kvm, model)
    add_slot(kvm, 0, 0, 6 * MiB, "thp")
    ept = EptBuilder(kvm)
    ept.map_range(0, 0, 6 * MiB, PG_LEVEL_2M)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 6 * MiB, 2 * MiB)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + KVM_MIN_FREE_MMU_PAGES)
    set_logging(kvm, 0, True)
    holds_for_merged_and_catches_the_mutant(model, checker.after_operation)


@pytest.mark.parametrize("model", ["merged", "mutants/split_no_flush_on_nonleaf_reuse"])
def test_missing_reuse_flush_is_caught_by_the_tlb_check(model: str) -> None:
    kvm, checker = new_vm("tdp")
    with_model(kvm, model)
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, INIT_SET)
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    ept = EptBuilder(kvm)
    ept.map(0, GiB >> 12, PG_LEVEL_1G)
    ept.map(GiB, GiB >> 12, PG_LEVEL_1G)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    set_logging(kvm, 0, True)
    run(kvm, checker, 0, GiB, GiB + 1, 4096)
    set_logging(kvm, 0, False)
    run(kvm, checker, 0, 0, 1, 4096)
    set_logging(kvm, 0, True)

    def clear() -> None:
        x86.kvm_clear_dirty_log(kvm, 0, 0, 64, (1).to_bytes(8, "little"))

    def clear_and_check() -> None:
        clear()
        checker.after_operation()

    holds_for_merged_and_catches_the_mutant(model, clear_and_check)


@pytest.mark.parametrize("model", ["merged", "mutants/split_stats_reused_as_fresh"])
def test_stats_of_a_reused_page_count_only_new_children(model: str) -> None:
    """Two EPT aliases of one 2M page: the second split reuses the first's page, k = 0 new children."""
    kvm, checker = new_vm("tdp")
    with_model(kvm, model)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    ept = EptBuilder(kvm)
    ept.map_range(0, 0, 2 * MiB, PG_LEVEL_2M)
    ept.map_range(64 * MiB, 0, 2 * MiB, PG_LEVEL_2M)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 1, 4096)
    run(kvm, checker, 0, 64 * MiB, 64 * MiB + 1, 4096)

    def start_logging() -> None:
        set_logging(kvm, 0, True)
        checker.after_operation()

    holds_for_merged_and_catches_the_mutant(model, start_logging)
    if model == "merged":
        assert kvm.model_split_env.events["reuse"] == 1


@pytest.mark.parametrize("model", ["merged", "mutants/split_always_allocates"])
def test_split_that_never_reuses_duplicates_a_shadow_page(model: str) -> None:
    """Two EPT aliases of one 2M page: the second split must find the first's page, not make another."""
    kvm, checker = new_vm("tdp")
    with_model(kvm, model)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    ept = EptBuilder(kvm)
    ept.map_range(0, 0, 2 * MiB, PG_LEVEL_2M)
    ept.map_range(64 * MiB, 0, 2 * MiB, PG_LEVEL_2M)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 1, 4096)
    run(kvm, checker, 0, 64 * MiB, 64 * MiB + 1, 4096)
    checker.detach()
    alone = Checker(kvm, [CAUGHT_BY["mutants/split_always_allocates"]])
    set_logging(kvm, 0, True)
    holds_for_merged_and_catches_the_mutant(model, alone.after_operation)


# The other eight: the ci machine finds and shrinks each when every test case
# starts from the focus of its stated trace (the machine still chooses and
# orders every rule after setup).
FOUND_FROM_FOCUS = {
    "mutants/fast_pf_no_mark_dirty": "race",
    "mutants/get_dirty_log_no_flush": "race",
    "mutants/split_always_allocates": "alias",
    "mutants/split_exec_at_2m": "clear",
    "mutants/split_guard_lt": "race",
    "mutants/split_no_flush_on_nonleaf_reuse": "alias_1g",
    "mutants/split_stats_reused_as_fresh": "alias",
    "mutants/tdp_zap_leaves_frozen": "race",
}


def test_every_mutant_is_found_by_the_machine_one_way_or_the_other() -> None:
    assert set(MACHINE_FINDS) | set(FOUND_FROM_FOCUS) == set(MUTANTS)


@pytest.mark.parametrize("name", sorted(FOUND_FROM_FOCUS))
def test_state_machine_from_the_stated_focus_finds_the_mutant_and_shrinks_it(name: str) -> None:
    base = machine_for("tdp", name)
    focused = type(f"{base.__name__}_{FOUND_FROM_FOCUS[name]}", (base,), {"forced_focus": FOUND_FROM_FOCUS[name]})
    with pytest.raises((InvariantViolation, KvmBugOn)) as excinfo:
        run_state_machine_as_test(focused, settings=CI_SHRINK)
    notes = "\n".join(getattr(excinfo.value, "__notes__", []))
    steps = [line for line in notes.splitlines() if line.strip().startswith("state.") and "teardown" not in line]
    assert steps and len(steps) <= model_module(name).SHORTEST_TRACE + 2, notes
