"""Every mutant is caught: a green run of the harness means something.

The faithful models pass the same checks (tests/stateful, tests/scenarios).
Mutants the random runs reach are caught by the state machine under the ci
profile (generation only, to keep CI short); the three whose trigger random
runs do not reach yet are caught by a directed test.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from kvmsplit.properties import invariants as _registers_invariants  # noqa: F401
from kvmsplit.properties.registry import INVARIANTS

from kvmsplit import shadow_mmu, x86
from kvmsplit.errors import InvariantViolation, KvmBugOn
from kvmsplit.kvm import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MIN_FREE_MMU_PAGES
from kvmsplit.machine import machine_for
from kvmsplit.models_registry import list_models, load_model, model_module
from kvmsplit.spte import PG_LEVEL_1G, PG_LEVEL_2M
from tests.helpers import EptBuilder, GiB, MiB, add_slot, new_vm, run, set_logging

INIT_SET = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# Mutant -> the invariant that must catch it.
CAUGHT_BY = {
    "mutants/split_allows_unsync_owner": "no_unsync_huge_sp",
    "mutants/split_keeps_ps_at_4k": "leaf_size_matches_level",
    "mutants/split_no_parent_pte": "parent_ptes_match_links",
    "mutants/split_no_rmap": "rmap_holds_exactly_present_leaves",
    "mutants/split_pfn_offset_wrong_level": "tlb_translations_allowed_at_unlock",
    "mutants/split_exec_at_2m": "nx_huge_page_not_executable",
    "mutants/split_guard_lt": "split_keeps_min_free_pages",
    "mutants/split_no_flush_on_nonleaf_reuse": "tlb_translations_allowed_at_unlock",
    "mutants/split_child_indirect": "leaf_maps_the_host_pfn_of_its_gfn",
    "mutants/split_stats_reused_as_fresh": "page_stats_count_present_leaves",
}
DIRECTED = {
    "mutants/split_exec_at_2m",
    "mutants/split_guard_lt",
    "mutants/split_no_flush_on_nonleaf_reuse",
    "mutants/split_stats_reused_as_fresh",
}

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


def test_every_mutant_is_listed_with_the_invariant_that_catches_it() -> None:
    mutants = {m for m in list_models() if m.startswith("mutants/")}
    assert mutants == set(CAUGHT_BY)
    for name, inv in CAUGHT_BY.items():
        assert inv in INVARIANTS
        # The invariant names this mutant, or shares its catch with the unlock TLB check.
        assert INVARIANTS[inv].mutant == name or inv == "tlb_translations_allowed_at_unlock"
        mod = model_module(name)
        assert (mod.__doc__ or "").strip() and isinstance(mod.SHORTEST_TRACE, int)


@pytest.mark.parametrize("name", sorted(set(CAUGHT_BY) - DIRECTED))
def test_state_machine_catches_the_mutant_and_shrinks_it(name: str) -> None:
    with pytest.raises((InvariantViolation, KvmBugOn)) as excinfo:
        run_state_machine_as_test(machine_for("tdp", name), settings=CI_SHRINK)
    assert getattr(excinfo.value, "name", None) == CAUGHT_BY[name]
    notes = "\n".join(getattr(excinfo.value, "__notes__", []))
    steps = [line for line in notes.splitlines() if line.strip().startswith("state.") and "teardown" not in line]
    assert steps, notes
    assert len(steps) <= model_module(name).SHORTEST_TRACE + 2, notes


@pytest.mark.parametrize(
    ("name", "initially_set"), [("mutants/split_guard_lt", False), ("mutants/split_exec_at_2m", True)]
)
def test_stated_shortest_trace_exposes_the_mutant_in_the_state_machine(name: str, initially_set: bool) -> None:

    try:
        state = machine_for("tdp", name)()
        state.setup(initially_set=initially_set, no_eager=False, nx=initially_set, plan=(0, 0, 0, "none", 0))
        with pytest.raises(InvariantViolation) as excinfo:
            if initially_set:
                state.kvm_mmu_slot_apply_flags()
                state.kvm_clear_dirty_log(slot=2, word=0, bits=[0])
            else:
                state.kvm_mmu_change_mmu_pages(headroom=KVM_MIN_FREE_MMU_PAGES)
                state.kvm_mmu_slot_apply_flags()
        assert excinfo.value.name == CAUGHT_BY[name]
        # setup plus the two operations above
        assert model_module(name).SHORTEST_TRACE == 3
    finally:
        state.teardown()


def holds_for_merged_and_catches_the_mutant(model: str, step) -> None:  # type: ignore[no-untyped-def]
    """Run @step: the faithful model passes, the mutant fails its named invariant."""
    if model == "merged":
        step()
        return
    with pytest.raises(InvariantViolation) as excinfo:
        step()
    assert excinfo.value.name == CAUGHT_BY[model]


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
    x86.kvm_clear_dirty_log(kvm, 0, 0, 64, (1).to_bytes(8, "little"))
    holds_for_merged_and_catches_the_mutant(model, checker.after_operation)


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
    set_logging(kvm, 0, True)
    holds_for_merged_and_catches_the_mutant(model, checker.after_operation)
    if model == "merged":
        assert kvm.model_split_env.events["reuse"] == 1
