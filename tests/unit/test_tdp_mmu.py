"""Unit tests for kvmsplit/tdp_mmu.py (arch/x86/kvm/mmu/tdp_mmu.c).

Each test drives the TDP MMU the way its kernel callers do and runs every
named invariant afterwards through a `Checker`.
"""

from __future__ import annotations

import errno

import pytest

from kvmsplit import mmu, shadow_mmu, tdp_mmu, x86
from kvmsplit.errors import KvmBugOn
from kvmsplit.memslot import dirty_bitmap_gfns
from kvmsplit.rmap import Sptep
from kvmsplit.spte import (
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    REMOVED_SPTE,
    SPTE_ENT_PER_PAGE,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_mmio_spte,
    spte_to_pfn,
)
from tests.helpers import HVA, MiB, add_slot, new_vm, run, set_logging


def tdp_vm(size: int = 4 * MiB, backing: str = "thp", access: str = "read", nr_vcpus: int = 1):
    """A TDP MMU VM whose vCPU 0 has touched every 2M frame of slot 0 once."""
    kvm, checker = new_vm("tdp", nr_vcpus=nr_vcpus)
    add_slot(kvm, 0, 0, size, backing)
    run(kvm, checker, 0, 0, size, 2 * MiB, access)
    return kvm, checker


def root_of(kvm, vcpu: int = 0):
    root = kvm.vcpus[vcpu].root_mmu.root
    assert root is not None and root.tdp_mmu_page
    return root


def iter_at(kvm, gfn: int, level: int) -> tdp_mmu.TdpIter:
    """The walk's iterator at @level for @gfn in vCPU 0's root."""
    for it in tdp_mmu.for_each_tdp_pte_min_level(kvm, root_of(kvm), level, gfn, gfn + 1):
        if it.level == level:
            return it
    raise AssertionError(f"no level-{level} SPTE for gfn {gfn:#x}")


def leaf(kvm, gfn: int) -> Sptep:
    return mmu.shadow_walk(kvm, root_of(kvm), gfn << PAGE_SHIFT)[-1]


# --- kvm_tdp_mmu_alloc_root() -------------------------------------------------------------


def test_vcpus_share_a_valid_root_with_the_same_role() -> None:
    """kvm_tdp_mmu_alloc_root(): a second vCPU takes a reference on the existing root."""
    kvm, checker = tdp_vm(nr_vcpus=2)
    root = root_of(kvm, 0)
    # One reference for vCPU 0, one held by the TDP MMU itself.
    assert root.root_count == 2
    run(kvm, checker, 1, 0, 1, 4096)
    assert root_of(kvm, 1) is root
    assert root.root_count == 3
    assert kvm.tdp_mmu_roots == [root]
    assert root.pfn in kvm.sp_by_pfn


def test_a_new_root_is_allocated_once_the_old_one_is_invalidated() -> None:
    """kvm_tdp_mmu_alloc_root() shares valid roots only; the invalid one goes with its last reference."""
    kvm, checker = tdp_vm(nr_vcpus=2)
    run(kvm, checker, 1, 0, 1, 4096)
    old = root_of(kvm, 0)
    role = mmu.mmu_root_role(kvm, kvm.vcpus[0])
    tdp_mmu.kvm_tdp_mmu_invalidate_all_roots(kvm)
    assert old.role.invalid and old.tdp_mmu_scheduled_root_to_zap
    new = tdp_mmu.kvm_tdp_mmu_get_vcpu_root(kvm, role)
    assert new is not old and not new.role.invalid
    assert new.root_count == 2 and old.root_count == 3
    assert kvm.tdp_mmu_roots == [new, old]
    assert tdp_mmu.kvm_tdp_mmu_get_vcpu_root(kvm, role) is new
    assert new.root_count == 3
    # kvm_tdp_mmu_zap_invalidated_roots() puts the TDP MMU's own reference, the vCPUs the rest.
    tdp_mmu.kvm_tdp_mmu_zap_invalidated_roots(kvm)
    assert old.root_count == 2 and kvm.stat.pages == [0, 0, 0]
    for vcpu in kvm.vcpus:
        shadow_mmu.kvm_mmu_free_roots(kvm, vcpu.root_mmu)
    assert kvm.tdp_mmu_roots == [new]
    assert old.pfn not in kvm.sp_by_pfn
    checker.after_operation()


# --- handle_changed_spte() ------------------------------------------------------------------


def test_zapping_a_leaf_takes_it_out_of_the_page_stats_and_restoring_it_puts_it_back() -> None:
    """handle_changed_spte(): present leaf <-> non-present moves pages[level - 1] by one."""
    kvm, checker = tdp_vm(backing="4k")
    sptep = leaf(kvm, 0)
    old = sptep.spte
    assert kvm.stat.pages_4k == 2
    tdp_mmu.tdp_mmu_set_spte(kvm, sptep, old, 0, 0, PG_LEVEL_4K)
    assert kvm.stat.pages_4k == 1
    tdp_mmu.tdp_mmu_set_spte(kvm, sptep, 0, old, 0, PG_LEVEL_4K)
    assert kvm.stat.pages_4k == 2
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_a_leaf_change_that_keeps_the_pfn_leaves_the_stats_alone() -> None:
    """handle_changed_spte(): leaf -> leaf (W cleared) is not a new mapping."""
    kvm, checker = tdp_vm(access="write")
    sptep = leaf(kvm, 0)
    old = sptep.spte
    tdp_mmu.tdp_mmu_set_spte(kvm, sptep, old, old & ~PT_WRITABLE_MASK, 0, PG_LEVEL_2M)
    assert kvm.stat.pages == [0, 2, 0]
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_replacing_a_present_leaf_with_another_pfn_is_a_kernel_bug() -> None:
    """handle_changed_spte(): a present leaf never changes pfn in place (BUG())."""
    kvm, checker = tdp_vm()
    old = leaf(kvm, 0).spte
    other = old + (512 << PAGE_SHIFT)
    with pytest.raises(KvmBugOn, match="handle_changed_spte"):
        tdp_mmu.handle_changed_spte(kvm, 0, old, other, PG_LEVEL_2M, False)
    assert kvm.stat.pages == [0, 2, 0]
    checker.after_operation()


def test_zapping_a_nonleaf_tears_down_its_table_and_every_leaf_below() -> None:
    """handle_changed_spte() -> handle_removed_pt(): the table is unlinked and its leaves leave the stats."""
    kvm, checker = tdp_vm()
    set_logging(kvm, 0, True)  # eager split: each 2M leaf becomes a table of 512 4K leaves
    checker.after_operation()
    assert kvm.stat.pages == [1024, 0, 0]
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    child = kvm.spte_to_child_sp(it.old_spte)
    tables = kvm.tdp_mmu_pages
    tdp_mmu.tdp_mmu_iter_set_spte(kvm, it, 0)
    assert kvm.stat.pages == [512, 0, 0]
    assert kvm.tdp_mmu_pages == tables - 1
    assert child.pfn not in kvm.sp_by_pfn
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_a_huge_leaf_over_a_table_counts_one_huge_page_and_drops_the_small_ones() -> None:
    """handle_changed_spte(): non-leaf -> leaf is +1 at the level and handle_removed_pt() for the table."""
    kvm, checker = tdp_vm(access="write")
    huge = leaf(kvm, 0).spte
    set_logging(kvm, 0, True)
    checker.after_operation()
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    assert not is_last_spte(it.old_spte, PG_LEVEL_2M)
    tdp_mmu.tdp_mmu_iter_set_spte(kvm, it, huge & ~PT_WRITABLE_MASK)
    assert kvm.stat.pages == [512, 1, 0]
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_a_change_between_two_non_present_values_is_not_counted() -> None:
    """handle_changed_spte(): !was_present && !is_present returns early (MMIO SPTEs)."""
    kvm, checker = tdp_vm()
    mmio = make_mmio_spte(kvm.masks, kvm.memslots_generation, 0x1234, 0)
    pages = list(kvm.stat.pages)
    tdp_mmu.handle_changed_spte(kvm, 0x1234, 0, mmio, PG_LEVEL_4K, False)
    assert kvm.stat.pages == pages
    checker.after_operation()


# --- tdp_mmu_split_huge_page() ------------------------------------------------------------------


def test_split_huge_page_installs_512_equal_children_without_a_flush() -> None:
    """tdp_mmu_split_huge_page(): stats -1 at 2M, +512 at 4K, children map huge_pfn + i, no TLB flush."""
    kvm, checker = tdp_vm(access="write")
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    huge_spte = it.old_spte
    flushes = kvm.stat.remote_tlb_flush_requests
    tables = kvm.tdp_mmu_pages
    sp = tdp_mmu.tdp_mmu_alloc_sp(kvm)
    tdp_mmu.tdp_mmu_init_child_sp(sp, it)
    assert tdp_mmu.tdp_mmu_split_huge_page(kvm, it, sp, True) == 0
    assert kvm.stat.pages == [512, 1, 0]
    assert kvm.tdp_mmu_pages == tables + 1
    assert kvm.stat.remote_tlb_flush_requests == flushes
    assert kvm.spte_to_child_sp(it.sptep.spte) is sp
    assert sp.role == it.sptep.sp.role.evolve(level=PG_LEVEL_4K) and sp.gfn == 0
    for i in range(SPTE_ENT_PER_PAGE):
        child = sp.spt[i]
        assert spte_to_pfn(child) == spte_to_pfn(huge_spte) + i
        assert not child & PT_PAGE_SIZE_MASK
        assert is_writable_pte(child)
    checker.after_operation()


def test_split_huge_page_that_loses_the_race_changes_nothing() -> None:
    """tdp_mmu_split_huge_page(): a failed tdp_mmu_link_sp() leaves the huge SPTE and the stats as they were."""
    kvm, checker = tdp_vm()
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    it.old_spte &= ~kvm.masks.shadow_accessed_mask  # a stale read
    current = it.sptep.spte
    sp = tdp_mmu.tdp_mmu_alloc_sp(kvm)
    tdp_mmu.tdp_mmu_init_child_sp(sp, it)
    assert tdp_mmu.tdp_mmu_split_huge_page(kvm, it, sp, True) == tdp_mmu.EBUSY
    assert it.sptep.spte == current and it.old_spte == current
    assert kvm.stat.pages == [0, 2, 0]
    assert sp.pfn not in kvm.sp_by_pfn
    checker.after_operation()


# --- tdp_mmu_set_spte_atomic() ------------------------------------------------------------------


def test_set_spte_atomic_fails_with_ebusy_and_refreshes_old_spte_when_the_spte_changed() -> None:
    """tdp_mmu_set_spte_atomic(): try_cmpxchg64() fails, -EBUSY, iter->old_spte holds the current value."""
    assert tdp_mmu.EBUSY == -errno.EBUSY
    kvm, checker = tdp_vm(access="write")
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    # Another thread ages the page between the read and the exchange.
    aged = it.old_spte & ~kvm.masks.shadow_accessed_mask
    it.sptep.sp.spt[it.sptep.index] = aged
    assert tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, it.old_spte & ~PT_WRITABLE_MASK) == tdp_mmu.EBUSY
    assert it.old_spte == aged
    assert it.sptep.spte == aged
    # A retry from the fresh value goes through.
    assert tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, aged & ~PT_WRITABLE_MASK) == 0
    assert it.sptep.spte == aged & ~PT_WRITABLE_MASK
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_set_spte_atomic_refuses_a_frozen_old_spte() -> None:
    """__tdp_mmu_set_spte_atomic(): WARN if asked to overwrite REMOVED_SPTE."""
    kvm, checker = tdp_vm()
    it = iter_at(kvm, 0, PG_LEVEL_2M)
    it.old_spte = REMOVED_SPTE
    with pytest.raises(KvmBugOn, match="tdp_mmu_set_spte_atomic"):
        tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, 0)
    checker.after_operation()


# --- tdp_mmu_zap_leafs() ----------------------------------------------------------------------


def test_zap_leafs_in_a_valid_root_asks_for_a_flush() -> None:
    """tdp_mmu_zap_leafs(): zapping in a root vCPUs may use needs a flush before mmu_lock is dropped."""
    kvm, checker = tdp_vm()
    root = root_of(kvm)
    assert tdp_mmu.tdp_mmu_zap_leafs(kvm, root, 0, 512, False)
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.tlb_flush_debt
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_zap_leafs_in_an_invalid_root_needs_no_flush() -> None:
    """tdp_mmu_zap_leafs(): no flush for invalid roots (a vCPU flushes when it loads a new root)."""
    kvm, checker = tdp_vm()
    root = root_of(kvm)
    tdp_mmu.kvm_tdp_mmu_invalidate_all_roots(kvm)
    assert not tdp_mmu.tdp_mmu_zap_leafs(kvm, root, 0, 512, False)
    assert kvm.stat.pages == [0, 1, 0]
    assert not kvm.tlb_flush_debt
    # The flag passed in is returned unchanged.
    assert tdp_mmu.tdp_mmu_zap_leafs(kvm, root, 512, 1024, True)
    assert kvm.stat.pages == [0, 0, 0]
    tdp_mmu.kvm_tdp_mmu_zap_invalidated_roots(kvm)
    checker.after_operation()


def test_kvm_tdp_mmu_zap_leafs_skips_invalid_roots() -> None:
    """kvm_tdp_mmu_zap_leafs() walks valid roots only; kvm_tdp_mmu_unmap_gfn_range() walks them all."""
    kvm, checker = tdp_vm()
    tdp_mmu.kvm_tdp_mmu_invalidate_all_roots(kvm)
    assert not tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, 0, 1024, False)
    assert kvm.stat.pages == [0, 2, 0]
    tdp_mmu.kvm_tdp_mmu_unmap_gfn_range(kvm, kvm.slot(0), 0, 1024, False)
    assert kvm.stat.pages == [0, 0, 0]
    tdp_mmu.kvm_tdp_mmu_zap_invalidated_roots(kvm)
    checker.after_operation()


# --- dirty logging: wrprot_gfn_range(), clear_dirty_pt_masked(), write_protect_gfn() -----------


def test_wrprot_gfn_range_clears_w_and_keeps_mmu_writable() -> None:
    """wrprot_gfn_range(): dirty logging clears W only, so fast_page_fault() can restore it."""
    kvm, checker = tdp_vm(access="write")
    root = root_of(kvm)
    assert tdp_mmu.wrprot_gfn_range(kvm, root, 0, 1024, PG_LEVEL_4K)
    for gfn in (0, 512):
        spte = leaf(kvm, gfn).spte
        assert not is_writable_pte(spte) and is_mmu_writable_spte(kvm.masks, spte)
    # Nothing writable is left: no SPTE changes.
    assert not tdp_mmu.wrprot_gfn_range(kvm, root, 0, 1024, PG_LEVEL_4K)
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_wrprot_gfn_range_leaves_leaves_below_min_level_alone() -> None:
    """wrprot_gfn_range(min_level=2M) walks no 4K SPTE."""
    kvm, checker = tdp_vm(size=2 * MiB, backing="4k", access="write")
    assert not tdp_mmu.wrprot_gfn_range(kvm, root_of(kvm), 0, 512, PG_LEVEL_2M)
    assert is_writable_pte(leaf(kvm, 0).spte)
    checker.after_operation()


def test_clear_dirty_pt_masked_write_protects_the_masked_4k_leaves_only() -> None:
    """clear_dirty_pt_masked(wrprot=true): W cleared on the 4K leaves in the mask, others untouched."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0, 3 * 4096, 4096, "write")
    tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(kvm, kvm.slot(0), 0, 0b011, True)
    assert not is_writable_pte(leaf(kvm, 0).spte) and not is_writable_pte(leaf(kvm, 1).spte)
    assert is_writable_pte(leaf(kvm, 2).spte)
    assert is_mmu_writable_spte(kvm.masks, leaf(kvm, 0).spte)
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_clear_dirty_pt_masked_without_wrprot_clears_the_dirty_bit() -> None:
    """clear_dirty_pt_masked(wrprot=false) with A/D bits (PML): D cleared, W kept."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0, 4096, 4096, "write")
    d = kvm.masks.shadow_dirty_mask
    assert leaf(kvm, 0).spte & d
    tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(kvm, kvm.slot(0), 0, 0b1, False)
    spte = leaf(kvm, 0).spte
    assert not spte & d and is_writable_pte(spte)
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


def test_clear_dirty_pt_masked_skips_huge_leaves() -> None:
    """clear_dirty_pt_masked(): iter.level > PG_LEVEL_4K is skipped; huge pages are write-protected elsewhere."""
    kvm, checker = tdp_vm(access="write")
    tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(kvm, kvm.slot(0), 0, 0b1, True)
    assert is_writable_pte(leaf(kvm, 0).spte)
    assert not kvm.tlb_flush_debt_deferred
    checker.after_operation()


def test_write_protect_gfn_clears_w_and_mmu_writable() -> None:
    """write_protect_gfn(): a shadowed gfn's mapping loses both W and MMU-writable."""
    kvm, checker = tdp_vm(access="write")
    slot = kvm.slot(0)
    assert tdp_mmu.kvm_tdp_mmu_write_protect_gfn(kvm, slot, 5, PG_LEVEL_4K)
    spte = leaf(kvm, 0).spte
    assert not is_writable_pte(spte) and not is_mmu_writable_spte(kvm.masks, spte)
    # Already protected: the walk stops at the unchanged SPTE.
    assert not tdp_mmu.kvm_tdp_mmu_write_protect_gfn(kvm, slot, 5, PG_LEVEL_4K)
    # The other 2M page is untouched.
    assert is_writable_pte(leaf(kvm, 512).spte)
    kvm.kvm_flush_remote_tlbs("test")
    checker.after_operation()


# --- kvm_tdp_mmu_zap_collapsible_sptes() --------------------------------------------------------


def test_zap_collapsible_sptes_zaps_tables_that_could_be_huge() -> None:
    """zap_collapsible_spte_range(): a non-leaf SPTE at 2M whose range could map huge is zapped with a flush."""
    kvm, checker = tdp_vm()
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages == [1024, 0, 0]
    tables = kvm.tdp_mmu_pages
    flushes = kvm.stat.remote_tlb_flush_requests
    set_logging(kvm, 0, False)
    checker.after_operation()
    assert kvm.stat.pages == [0, 0, 0]
    assert kvm.tdp_mmu_pages == tables - 2
    assert not is_shadow_present_pte(iter_at(kvm, 0, PG_LEVEL_2M).old_spte)
    # tdp_mmu_zap_spte_atomic() flushes each zapped SPTE's range.
    assert kvm.stat.remote_tlb_flush_requests == flushes + 2
    run(kvm, checker, 0, 0, 4 * MiB, 2 * MiB)
    assert kvm.stat.pages == [0, 2, 0]


def test_zap_collapsible_sptes_keeps_a_table_whose_host_page_is_4k() -> None:
    """zap_collapsible_spte_range(): kvm_mmu_max_mapping_level() < level keeps the table."""
    kvm, checker = tdp_vm()
    set_logging(kvm, 0, True)
    # The host splits its second 2M page: that frame can only be mapped with 4K pages.
    x86.host_thp_split(kvm, HVA + 2 * MiB)
    run(kvm, checker, 0, 2 * MiB, 4 * MiB, 4096)
    assert kvm.stat.pages == [1024, 0, 0]
    set_logging(kvm, 0, False)
    checker.after_operation()
    assert kvm.stat.pages == [512, 0, 0]
    assert is_shadow_present_pte(iter_at(kvm, 512, PG_LEVEL_2M).old_spte)
    assert not is_shadow_present_pte(iter_at(kvm, 0, PG_LEVEL_2M).old_spte)


# --- kvm_tdp_mmu_map() --------------------------------------------------------------------------


def test_map_splits_a_huge_spte_above_the_goal_level_in_place() -> None:
    """kvm_tdp_mmu_map(): a write to a dirty-logged frame still mapped 2M splits it in place, no flush."""
    kvm, checker = tdp_vm(access="write")
    x86.set_eager_page_split(kvm, False)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages == [0, 2, 0]
    flushes = kvm.stat.remote_tlb_flush_requests
    tables = kvm.tdp_mmu_pages
    run(kvm, checker, 0, 0x3000, 0x3001, 4096, "write")
    assert kvm.stat.pages == [512, 1, 0]
    assert kvm.tdp_mmu_pages == tables + 1
    assert kvm.stat.remote_tlb_flush_requests == flushes
    # The written page is writable and logged; its siblings keep the huge SPTE's write-protection.
    assert is_writable_pte(leaf(kvm, 3).spte)
    assert not is_writable_pte(leaf(kvm, 4).spte)
    assert dirty_bitmap_gfns(kvm.slot(0)) == [3]


def test_map_links_a_new_table_into_a_hole() -> None:
    """kvm_tdp_mmu_map(): non-present SPTEs above the goal get a new table (tdp_mmu_link_sp())."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    assert kvm.tdp_mmu_pages == 0
    run(kvm, checker, 0, 0, 4096, 4096)
    # The 512G, 1G and 2M tables below the root.
    assert kvm.tdp_mmu_pages == 3
    assert kvm.stat.pages == [1, 0, 0]
