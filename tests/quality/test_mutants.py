"""Every mutant is caught: a green run of the harness means something.

Three checks, all under the ci profile:
- every invariant names a mutant, and that mutant's stated shortest trace
  (its module's STATED_TRACE) passes on the faithful model and fails on the
  mutant with that invariant alone checked (an earlier invariant of a full
  check may see the bug first);
- the state machine finds every mutant where its module's HUNT says (an MMU
  configuration, and for some a focus every test case starts from) and
  shrinks it to at most its stated length plus two steps;
- directed tests through the Python API, beside the faithful model, for the
  split details (reuse, the guard, exec under NX) the traces build up to.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from kvmsplit.properties import invariants as _registers_invariants  # noqa: F401
from kvmsplit.properties.registry import INVARIANTS, by_mutant

from kvmsplit import shadow_mmu, x86
from kvmsplit.checker import Checker
from kvmsplit.errors import InvariantViolation
from kvmsplit.kvm import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MIN_FREE_MMU_PAGES
from kvmsplit.machine import SIMPLEST_SETUP, Hunt, StatedTrace, machine_for, setup_draws
from kvmsplit.models_registry import list_models, load_model, model_module
from kvmsplit.profiles import profile_settings
from kvmsplit.spte import PG_LEVEL_1G, PG_LEVEL_2M
from tests.helpers import EptBuilder, GiB, MiB, add_slot, new_vm, on_a_fresh_stack, run, set_logging

INIT_SET = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
MUTANTS = sorted(m for m in list_models() if m.startswith("mutants/"))

# Mutant -> the invariants whose @invariant(mutant=...) names it.
CAUGHT_BY = by_mutant()

# The ci profile as `kvmsplit check` runs it, stopping at the first failure.
CI = settings(profile_settings("ci"), report_multiple_bugs=False, suppress_health_check=list(HealthCheck))


def test_every_invariant_names_a_mutant_and_every_mutant_is_named() -> None:
    for inv in INVARIANTS.values():
        assert inv.mutant in MUTANTS, f"{inv.name} names no existing mutant: {inv.mutant!r}"
    assert set(CAUGHT_BY) == set(MUTANTS)


def test_simplest_setup_names_every_setup_draw() -> None:
    assert set(SIMPLEST_SETUP) == set(setup_draws(st.just("none")))


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_states_what_it_breaks_its_shortest_trace_and_its_hunt(name: str) -> None:
    mod = model_module(name)
    assert (mod.__doc__ or "").strip(), f"{name} has no docstring"
    for inv in CAUGHT_BY[name]:
        assert inv in mod.__doc__, f"{name}'s docstring does not name {inv}, the invariant it breaks"
    assert isinstance(mod.STATED_TRACE, StatedTrace) and isinstance(mod.HUNT, Hunt)
    assert mod.STATED_TRACE.steps == mod.SHORTEST_TRACE


@pytest.mark.parametrize("name", MUTANTS)
def test_stated_trace_passes_on_the_merged_model(name: str) -> None:
    model_module(name).STATED_TRACE.run("merged")


@pytest.mark.parametrize("invariant", sorted(INVARIANTS))
def test_invariant_alone_catches_its_mutant_on_the_stated_trace(invariant: str) -> None:
    mutant = INVARIANTS[invariant].mutant
    with pytest.raises(InvariantViolation) as excinfo:
        model_module(mutant).STATED_TRACE.run(mutant, (invariant,))
    assert excinfo.value.name == invariant


@pytest.mark.parametrize("name", MUTANTS)
def test_state_machine_finds_the_mutant_and_shrinks_it(name: str) -> None:
    """The ci-profile machine of the mutant's HUNT finds it and shrinks it to its stated length plus two.

    Only the mutant's own invariant is checked: that keeps each step cheap,
    which matters most while shrinking, and loses nothing, because the
    machine's draws do not depend on what is checked until a check fails,
    so with every invariant checked the same example fails, or an earlier one.
    """
    hunt = model_module(name).HUNT
    machine = machine_for(hunt.mmu, name, CAUGHT_BY[name], focus=hunt.focus)
    with pytest.raises(InvariantViolation) as excinfo:
        on_a_fresh_stack(lambda: run_state_machine_as_test(machine, settings=CI))
    assert excinfo.value.name in CAUGHT_BY[name]
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
    assert excinfo.value.name in (*CAUGHT_BY[model], "split_keeps_gfn_to_pfn_mapping")


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
    alone = Checker(kvm, list(CAUGHT_BY["mutants/split_always_allocates"]))
    set_logging(kvm, 0, True)
    holds_for_merged_and_catches_the_mutant(model, alone.after_operation)
