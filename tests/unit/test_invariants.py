"""Unit tests for properties/invariants.py: no invariant is vacuous.

Each test builds a small healthy VM on which every invariant holds, breaks
the state directly in the smallest way the invariant forbids, and checks that
exactly that invariant fails, under its own name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from kvmsplit.properties import invariants
from kvmsplit.properties.registry import INVARIANTS, KINDS

from kvmsplit import mmu, shadow_mmu, tdp_mmu, x86
from kvmsplit.errors import InvariantViolation
from kvmsplit.guest import X86_GPT, guest_build_identity_map
from kvmsplit.kvm import Kvm
from kvmsplit.mmu_page import KVM_MMU_HASH_SHIFT, KvmMmuPage, hash_64, kvm_mmu_page_get_gfn
from kvmsplit.rmap import Sptep, pte_list_remove, rmap_first
from kvmsplit.spte import (
    ACC_EXEC_MASK,
    EPT_SPTE_MMU_WRITABLE,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    REMOVED_SPTE,
    VMX_EPT_EXECUTABLE_MASK,
    is_executable_pte,
)
from kvmsplit.tdp_mmu import SHADOW_NONPRESENT_VALUE
from tests.helpers import MiB, add_slot, new_vm, set_logging

REQUIRED = (
    "leaf_spte_writable_triad",
    "nonleaf_spte_points_at_child_table",
    "leaf_size_matches_level",
    "nx_huge_page_not_executable",
    "dirty_logged_slot_has_no_writable_huge_leaf",
    "shadow_page_hash_unique",
    "parent_ptes_match_links",
    "rmap_holds_exactly_present_leaves",
    "no_unsync_huge_sp",
    "unsync_children_counted",
    "shadowed_gfns_write_protected",
    "mmu_pages_accounted",
    "page_stats_count_present_leaves",
    "live_pages_are_reachable",
    "tlb_translations_allowed_strict",
    "tlb_translations_allowed_at_unlock",
    "flush_debt_paid_at_unlock",
    "flush_debt_paid_at_return",
    "split_keeps_gfn_to_pfn_mapping",
    "split_moves_page_stats_to_its_children",
)


def failing(kvm: Kvm) -> dict[str, str]:
    """Every registered invariant that fails on @kvm, mapped to the name its violation carries."""
    out = {}
    for name, inv in INVARIANTS.items():
        if inv.kind in ("split", "split_pass"):
            continue  # transition invariants take a record of the split; see below
        try:
            inv(kvm)
        except InvariantViolation as e:
            out[name] = e.name
    return out


def assert_violates_only(kvm: Kvm, name: str) -> None:
    with pytest.raises(InvariantViolation) as excinfo:
        INVARIANTS[name](kvm)
    assert excinfo.value.name == name
    assert failing(kvm) == {name: name}


def direct_vm(mmu_kind: str = "tdp", **params: bool) -> Kvm:
    """L1 on TDP: a 2M leaf at gpa 0 (THP) and two 4K leaves at 64 MiB (4k backing)."""
    kvm, checker = new_vm(mmu_kind, **params)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    add_slot(kvm, 1, 64 * MiB, 2 * MiB, "4k")
    mmu.kvm_vcpu_access(kvm, 0, 0, write=True)
    mmu.kvm_vcpu_access(kvm, 0, 64 * MiB, write=True)
    mmu.kvm_vcpu_access(kvm, 0, 64 * MiB + 0x1000)
    checker.after_operation()
    checker.detach()
    assert kvm.stat.pages == [2, 1, 0]
    assert failing(kvm) == {}
    return kvm


def shadow_paging_vm() -> Kvm:
    """Shadow paging of a guest with 2M pages whose page tables sit at gfns 0x10-0x12."""
    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    guest_build_identity_map(
        kvm, X86_GPT, root_gfn=0x10, table_gfns=[0x11, 0x12], gfn_start=0, npages=1024, page_level=PG_LEVEL_2M
    )
    x86.kvm_set_cr3(kvm, 0, 0x10)
    mmu.kvm_vcpu_access(kvm, 0, 0x10 << 12, write=True)
    mmu.kvm_vcpu_access(kvm, 0, 2 * MiB, write=True)
    checker.after_operation()
    checker.detach()
    assert kvm.indirect_shadow_pages == 3
    assert failing(kvm) == {}
    return kvm


def leaf(kvm: Kvm, level: int) -> Sptep:
    for sp, i, _ in invariants.present_leaves(kvm):
        if sp.role.level == level:
            return Sptep(sp, i)
    raise AssertionError(f"no level-{level} leaf")


def set_bits(sptep: Sptep, bits: int) -> None:
    sptep.sp.spt[sptep.index] |= bits


def clear_bits(sptep: Sptep, bits: int) -> None:
    sptep.sp.spt[sptep.index] &= ~bits


BOTH_DIRECT_MMUS = pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])


# --- The registry. ------------------------------------------------------------------------


def test_the_invariants_the_harness_relies_on_are_registered() -> None:
    assert set(REQUIRED) <= set(INVARIANTS)


@pytest.mark.parametrize("name", sorted(INVARIANTS))
def test_every_invariant_has_a_statement_a_kernel_reference_and_an_existing_mutant(name: str) -> None:
    from kvmsplit.models_registry import list_models

    inv = INVARIANTS[name]
    assert inv.name == name == inv.func.__name__
    assert inv.kind in KINDS
    assert inv.statement.strip() and inv.statement != name
    assert inv.kernel.strip()
    # A named mutant must exist; invariants without one yet say None.
    assert inv.mutant is None or inv.mutant in list_models()


@pytest.mark.parametrize("builder", [direct_vm, lambda: direct_vm("tdp-legacy"), shadow_paging_vm])
def test_a_healthy_vm_passes_every_invariant(builder: Callable[[], Kvm]) -> None:
    assert failing(builder()) == {}


# --- SPTE level. ----------------------------------------------------------------------------


@BOTH_DIRECT_MMUS
def test_leaf_spte_writable_triad_catches_w_without_mmu_writable(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    clear_bits(leaf(kvm, PG_LEVEL_4K), EPT_SPTE_MMU_WRITABLE)
    assert_violates_only(kvm, "leaf_spte_writable_triad")


@BOTH_DIRECT_MMUS
def test_nonleaf_spte_points_at_child_table_catches_a_nonleaf_without_write(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    root = kvm.vcpus[0].root_mmu.root
    assert root is not None
    clear_bits(Sptep(root, 0), PT_WRITABLE_MASK)
    assert_violates_only(kvm, "nonleaf_spte_points_at_child_table")


@BOTH_DIRECT_MMUS
def test_leaf_size_matches_level_catches_ps_on_a_4k_leaf(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    set_bits(leaf(kvm, PG_LEVEL_4K), PT_PAGE_SIZE_MASK)
    assert_violates_only(kvm, "leaf_size_matches_level")


@BOTH_DIRECT_MMUS
def test_nx_huge_page_not_executable_catches_an_executable_2m_leaf(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind, nx_huge_pages=True)
    huge = leaf(kvm, PG_LEVEL_2M)
    assert not is_executable_pte(kvm.masks, huge.spte)
    set_bits(huge, VMX_EPT_EXECUTABLE_MASK)
    assert_violates_only(kvm, "nx_huge_page_not_executable")


def test_nx_huge_page_not_executable_holds_while_the_mitigation_is_off() -> None:
    kvm = direct_vm("tdp", nx_huge_pages=True)
    set_bits(leaf(kvm, PG_LEVEL_2M), VMX_EPT_EXECUTABLE_MASK)
    kvm.disable_nx_huge_pages = True
    assert failing(kvm) == {}


@BOTH_DIRECT_MMUS
def test_dirty_logged_slot_has_no_writable_huge_leaf_catches_w_restored_on_a_2m_leaf(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind, eager_page_split=False)
    set_logging(kvm, 0, True)
    huge = leaf(kvm, PG_LEVEL_2M)
    assert failing(kvm) == {}
    # Dirty logging cleared only W; MMU-writable stays, so the triad still holds.
    set_bits(huge, PT_WRITABLE_MASK)
    assert_violates_only(kvm, "dirty_logged_slot_has_no_writable_huge_leaf")


def test_dirty_logged_slot_has_no_writable_huge_leaf_excepts_initially_set_mode() -> None:
    kvm = direct_vm("tdp", eager_page_split=False)
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, 3)
    set_logging(kvm, 0, True)
    assert failing(kvm) == {}


@BOTH_DIRECT_MMUS
def test_only_present_leaves_or_mmio_in_tables_catches_a_frozen_spte(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    sptep = leaf(kvm, PG_LEVEL_4K)
    assert sptep.sp.spt[100] == SHADOW_NONPRESENT_VALUE
    sptep.sp.spt[100] = REMOVED_SPTE
    assert_violates_only(kvm, "only_present_leaves_or_mmio_in_tables")


# --- Shadow page structure. ----------------------------------------------------------------------


def test_shadow_page_hash_unique_catches_a_second_page_for_the_same_gfn_and_role() -> None:
    kvm = direct_vm("tdp-legacy")
    sp = leaf(kvm, PG_LEVEL_4K).sp
    twin = KvmMmuPage(role=sp.role, gfn=sp.gfn, pfn=kvm.alloc_page_table_pfn(), mmu_valid_gen=kvm.mmu_valid_gen)
    kvm.mmu_page_hash[hash_64(sp.gfn, KVM_MMU_HASH_SHIFT)].append(twin)
    assert_violates_only(kvm, "shadow_page_hash_unique")


def test_shadow_page_hash_unique_catches_an_active_page_missing_from_the_hash() -> None:
    kvm = direct_vm("tdp-legacy")
    sp = leaf(kvm, PG_LEVEL_4K).sp
    kvm.mmu_page_hash[hash_64(sp.gfn, KVM_MMU_HASH_SHIFT)].remove(sp)
    assert_violates_only(kvm, "shadow_page_hash_unique")


def test_parent_ptes_match_links_catches_a_dropped_parent_pte() -> None:
    kvm = direct_vm("tdp-legacy")
    sp = leaf(kvm, PG_LEVEL_4K).sp
    parent = rmap_first(sp.parent_ptes)
    assert parent is not None
    pte_list_remove(parent, sp.parent_ptes)
    assert_violates_only(kvm, "parent_ptes_match_links")


def test_rmap_holds_exactly_present_leaves_catches_a_dropped_rmap_entry() -> None:
    kvm = direct_vm("tdp-legacy")
    shadow_mmu.rmap_remove(kvm, leaf(kvm, PG_LEVEL_2M))
    assert_violates_only(kvm, "rmap_holds_exactly_present_leaves")


def test_no_unsync_huge_sp_catches_an_unsync_direct_root() -> None:
    kvm = direct_vm("tdp-legacy")
    root = kvm.vcpus[0].root_mmu.root
    assert root is not None
    root.unsync = True
    assert_violates_only(kvm, "no_unsync_huge_sp")


def test_unsync_children_counted_catches_a_count_without_a_bitmap_bit() -> None:
    kvm = direct_vm("tdp-legacy")
    leaf(kvm, PG_LEVEL_4K).sp.unsync_children += 1
    assert_violates_only(kvm, "unsync_children_counted")


@BOTH_DIRECT_MMUS
def test_child_role_matches_parent_catches_a_child_with_another_role(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    sp = leaf(kvm, PG_LEVEL_4K).sp
    sp.role = sp.role.evolve(smep_andnot_wp=True)
    assert_violates_only(kvm, "child_role_matches_parent")


def test_shadowed_gfns_write_protected_catches_a_writable_spte_on_a_guest_page_table() -> None:
    kvm = shadow_paging_vm()
    table = next(Sptep(sp, i) for sp, i, _ in invariants.present_leaves(kvm) if kvm_mmu_page_get_gfn(sp, i) == 0x10)
    # W with MMU-writable, so the writable triad still holds.
    set_bits(table, PT_WRITABLE_MASK | kvm.masks.shadow_mmu_writable_mask)
    assert_violates_only(kvm, "shadowed_gfns_write_protected")


def test_shadowed_gfns_write_protected_catches_a_lost_write_track_count() -> None:
    kvm = shadow_paging_vm()
    slot = kvm.slot(0)
    del slot.gfn_write_track[0x11]
    assert_violates_only(kvm, "shadowed_gfns_write_protected")


# --- Accounting. -------------------------------------------------------------------------------------


def test_mmu_pages_accounted_catches_an_extra_tdp_mmu_page() -> None:
    kvm = direct_vm("tdp")
    kvm.tdp_mmu_pages += 1
    assert_violates_only(kvm, "mmu_pages_accounted")


def test_mmu_pages_accounted_catches_an_extra_shadow_page() -> None:
    kvm = direct_vm("tdp-legacy")
    kvm.n_used_mmu_pages += 1
    assert_violates_only(kvm, "mmu_pages_accounted")


@BOTH_DIRECT_MMUS
def test_page_stats_count_present_leaves_catches_a_bumped_4k_count(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    kvm.stat.pages[0] += 1
    assert_violates_only(kvm, "page_stats_count_present_leaves")


@BOTH_DIRECT_MMUS
def test_live_pages_are_reachable_catches_a_leaked_accounted_table(mmu_kind: str) -> None:
    kvm = direct_vm(mmu_kind)
    sp = leaf(kvm, PG_LEVEL_4K).sp
    leaked = KvmMmuPage(
        role=sp.role, gfn=sp.gfn + (16 << 9), pfn=kvm.alloc_page_table_pfn(), tdp_mmu_page=sp.tdp_mmu_page
    )
    kvm.sp_by_pfn[leaked.pfn] = leaked
    if leaked.tdp_mmu_page:
        kvm.tdp_mmu_pages += 1
    assert_violates_only(kvm, "live_pages_are_reachable")


# --- TLBs and flushes. ---------------------------------------------------------------------------------


def test_tlb_translations_allowed_at_unlock_catches_a_zap_without_a_flush() -> None:
    """Clear a leaf the vCPU TLB caches (stats kept right), with no flush."""
    kvm = direct_vm("tdp")
    huge = leaf(kvm, PG_LEVEL_2M)
    assert ("root_mmu", PG_LEVEL_2M, 0) in kvm.vcpus[0].tlb.leaves
    tdp_mmu.tdp_mmu_set_spte(kvm, huge, huge.spte, SHADOW_NONPRESENT_VALUE, 0, PG_LEVEL_2M)
    assert kvm.stat.pages == [2, 0, 0]
    with pytest.raises(InvariantViolation) as excinfo:
        INVARIANTS["tlb_translations_allowed_at_unlock"](kvm)
    assert excinfo.value.name == "tlb_translations_allowed_at_unlock"
    assert "is cached but its SPTE" in excinfo.value.message
    # The strict variant is the same check with no exception, so it fails too.
    assert set(failing(kvm)) == {"tlb_translations_allowed_at_unlock", "tlb_translations_allowed_strict"}


def test_tlb_translations_allowed_at_unlock_catches_a_cached_pfn_the_sptes_do_not_map() -> None:
    kvm = direct_vm("tdp-legacy")
    tlb = kvm.vcpus[0].tlb
    key = ("root_mmu", PG_LEVEL_4K, (64 * MiB) >> 12)
    tlb.leaves[key] = attrs.evolve(tlb.leaves[key], pfn=tlb.leaves[key].pfn + 512)
    assert failing(kvm)["tlb_translations_allowed_at_unlock"] == "tlb_translations_allowed_at_unlock"
    assert set(failing(kvm)) == {"tlb_translations_allowed_at_unlock", "tlb_translations_allowed_strict"}


def test_tlb_translations_allowed_at_unlock_excepts_a_dirty_logging_w_clear() -> None:
    """W cleared with MMU-writable kept is flushed before returning to userspace, not before unlock."""
    kvm = direct_vm("tdp")
    clear_bits(leaf(kvm, PG_LEVEL_2M), PT_WRITABLE_MASK)
    assert "tlb_translations_allowed_at_unlock" not in failing(kvm)


def test_tlb_translations_allowed_at_unlock_catches_a_cached_right_the_spte_lost() -> None:
    kvm = direct_vm("tdp")
    clear_bits(leaf(kvm, PG_LEVEL_2M), VMX_EPT_EXECUTABLE_MASK)
    entry = kvm.vcpus[0].tlb.leaves[("root_mmu", PG_LEVEL_2M, 0)]
    assert entry.access & ACC_EXEC_MASK
    assert failing(kvm)["tlb_translations_allowed_at_unlock"] == "tlb_translations_allowed_at_unlock"


def test_flush_debt_paid_at_unlock_catches_a_zap_left_unflushed() -> None:
    kvm = direct_vm("tdp")
    # Empty the TLBs first, so only the debt is wrong.
    kvm.kvm_flush_remote_tlbs("test")
    assert tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, 0, 512, False)
    assert kvm.stat.pages == [2, 0, 0]
    with pytest.raises(InvariantViolation) as excinfo:
        INVARIANTS["flush_debt_paid_at_unlock"](kvm)
    assert excinfo.value.name == "flush_debt_paid_at_unlock"
    assert "tdp_mmu_zap_leafs()" in excinfo.value.message
    # A debt owed at unlock is owed at return too.
    assert failing(kvm) == {
        "flush_debt_paid_at_unlock": "flush_debt_paid_at_unlock",
        "flush_debt_paid_at_return": "flush_debt_paid_at_return",
    }


def test_flush_debt_paid_at_return_catches_a_dirty_logging_write_protect_left_unflushed() -> None:
    kvm = direct_vm("tdp")
    kvm.kvm_flush_remote_tlbs("test")
    assert tdp_mmu.kvm_tdp_mmu_wrprot_slot(kvm, kvm.slot(0), PG_LEVEL_4K)
    assert kvm.tlb_flush_debt_deferred and not kvm.tlb_flush_debt
    assert_violates_only(kvm, "flush_debt_paid_at_return")


def test_a_flush_pays_every_debt() -> None:
    kvm = direct_vm("tdp")
    tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, 0, 512, False)
    tdp_mmu.kvm_tdp_mmu_wrprot_slot(kvm, kvm.slot(1), PG_LEVEL_4K)
    kvm.kvm_flush_remote_tlbs("test")
    assert failing(kvm) == {}


def test_tlb_check_catches_a_cached_table_entry_whose_spte_changed() -> None:
    """A cached paging-structure entry must still point at the table the SPTE points at."""
    from kvmsplit.properties.invariants import tlb_translations_allowed_at_unlock

    from kvmsplit import mmu as _mmu
    from kvmsplit import x86 as _x86
    from kvmsplit.errors import InvariantViolation as _Violation
    from kvmsplit.kvm import Kvm as _Kvm

    kvm = _Kvm.create("tdp")
    _x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 4 << 20, 0x7F00_0000_0000, "thp")
    _mmu.kvm_vcpu_access(kvm, 0, 0x1000, write=True)
    vcpu = kvm.vcpus[0]
    assert vcpu.tlb.walks, "the access walked two non-leaf levels"
    tlb_translations_allowed_at_unlock(kvm)
    vcpu.tlb.leaves.clear()  # only the paging-structure caches remain
    root = vcpu.root_mmu.root
    root.spt[0] = 0  # the top-level entry is gone, with no flush
    with pytest.raises(_Violation) as excinfo:
        tlb_translations_allowed_at_unlock(kvm)
    assert excinfo.value.name == "tlb_translations_allowed_at_unlock"
    assert "walk cache" in excinfo.value.message


def test_dirty_log_invariant_catches_a_write_through_a_stale_tlb_entry() -> None:
    """Skip the flush of KVM_GET_DIRTY_LOG: the next write hits the stale writable TLB entry and is never logged."""
    from unittest import mock

    from kvmsplit.properties.invariants import dirty_log_records_every_write

    from kvmsplit import mmu as _mmu
    from kvmsplit import x86 as _x86
    from kvmsplit.errors import InvariantViolation as _Violation
    from kvmsplit.kvm import Kvm as _Kvm
    from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES as _LOG

    kvm = _Kvm.create("tdp")
    hva = 0x7F00_0000_0000
    _x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 4 << 20, hva, "thp")
    _x86.kvm_set_user_memory_region(kvm, 0, _LOG, 0, 4 << 20, hva)
    _mmu.kvm_vcpu_access(kvm, 0, 0x3000, write=True)
    dirty_log_records_every_write(kvm)
    with mock.patch.object(_Kvm, "kvm_flush_remote_tlbs_memslot", lambda self, slot, reason="": None):
        assert _x86.kvm_get_dirty_log(kvm, 0)
    r = _mmu.kvm_vcpu_access(kvm, 0, 0x3000, write=True)
    assert r.outcome == "tlb"
    with pytest.raises(_Violation) as excinfo:
        dirty_log_records_every_write(kvm)
    assert excinfo.value.name == "dirty_log_records_every_write"


# --- Transition invariants. ---------------------------------------------------------------


def eager_split(mmu_kind: str, at_split: Callable[[Kvm, Any], None] | None = None) -> tuple[Any, list[Any]]:
    """Eager-split 4 MiB of 2M pages (nested, for the shadow MMU); return the checker and the records.

    @at_split runs at each split of @mmu_kind, after the checker's own
    transition checks, while the record still describes the MMU.
    """
    from kvmsplit.guest import EPT_GPT, guest_build_identity_map

    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    add_slot(kvm, 1, 64 * MiB, 4 * MiB, "4k")
    records: list[Any] = []

    def observe(k: Kvm, rec: Any) -> None:
        if rec.mmu == mmu_kind:
            records.append(rec)
            if at_split is not None:
                at_split(k, rec)

    kvm.model_split_env.observers.append(observe)
    if mmu_kind == "shadow":
        root = 64 * MiB >> 12
        tables = [root + 1 + i for i in range(4)]
        guest_build_identity_map(kvm, EPT_GPT, root_gfn=root, table_gfns=tables, gfn_start=0, npages=1024, page_level=2)
        x86.nested_vmx_enter(kvm, 0, root)
    for addr in (0, 2 * MiB):
        mmu.kvm_vcpu_access(kvm, 0, addr)
    set_logging(kvm, 0, True)
    checker.after_operation()
    return checker, records


@pytest.mark.parametrize("mmu_kind", ["tdp", "shadow"])
def test_split_transition_invariants_run_on_every_split_and_hold(mmu_kind: str) -> None:
    checker, records = eager_split(mmu_kind)
    assert len(records) == 2 and all(r.child is not None and not r.reused for r in records)
    assert checker.split_checks >= 2


def violation(name: str, kvm: Kvm, rec: Any) -> str:
    with pytest.raises(InvariantViolation) as excinfo:
        INVARIANTS[name](kvm, rec)
    assert excinfo.value.name == name
    return excinfo.value.message


@pytest.mark.parametrize("mmu_kind", ["tdp", "shadow"])
def test_gfn_to_pfn_transition_catches_a_child_mapping_another_pfn(mmu_kind: str) -> None:
    seen: list[str] = []

    def corrupt(kvm: Kvm, rec: Any) -> None:
        rec.child.spt[5] += 1 << 12
        seen.append(violation("split_keeps_gfn_to_pfn_mapping", kvm, rec))
        rec.child.spt[5] -= 1 << 12

    eager_split(mmu_kind, corrupt)
    assert len(seen) == 2 and all("[5] maps gfn" in m for m in seen)


def test_gfn_to_pfn_transition_allows_exec_only_at_4k_under_nx() -> None:
    outcomes: list[str] = []

    def check(kvm: Kvm, rec: Any) -> None:
        m = kvm.masks
        huge = rec.huge_spte
        rec.huge_spte = (huge & ~m.shadow_x_mask) | m.shadow_nx_mask
        outcomes.append(violation("split_keeps_gfn_to_pfn_mapping", kvm, rec))
        # Under the NX huge page mitigation an executable 4K child is the documented change.
        kvm.nx_huge_pages = True
        INVARIANTS["split_keeps_gfn_to_pfn_mapping"](kvm, rec)
        kvm.nx_huge_pages = False
        rec.huge_spte = huge

    eager_split("tdp", check)
    assert len(outcomes) == 2 and all("(W, U, X)" in m for m in outcomes)


def test_stats_transition_catches_a_split_counted_twice() -> None:
    seen: list[str] = []

    def recount(kvm: Kvm, rec: Any) -> None:
        kvm.stat.pages[0] += 1
        seen.append(violation("split_moves_page_stats_to_its_children", kvm, rec))
        kvm.stat.pages[0] -= 1

    eager_split("tdp", recount)
    assert len(seen) == 2
