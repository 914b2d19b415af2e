"""Unit tests for kvmsplit/mmu.py (faults, prefetch, zapping, the MMU notifier and MMIO in mmu.c).

Each test drives a fault or a zap the way KVM's callers do and runs every
named invariant afterwards through a `Checker`.
"""

from __future__ import annotations

from kvmsplit import mmu, x86
from kvmsplit.guest import X86_GPT, guest_build_identity_map
from kvmsplit.memslot import (
    KVM_MEM_READONLY,
    dirty_bitmap_gfns,
    gfn_to_rmap,
    kvm_mmu_gfn_allow_lpage,
    kvm_mmu_gfn_disallow_lpage,
)
from kvmsplit.spte import (
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_host_writable_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from kvmsplit.tdp_mmu import write_protect_gfn
from tests.helpers import HVA, EptBuilder, GiB, MiB, add_slot, new_vm, run, set_logging


def leaf(kvm, gfn_or_addr: int, *, addr: bool = False):
    """The last SPTE vCPU 0's walk reaches for a gfn (or, with @addr, an address)."""
    a = gfn_or_addr if addr else gfn_or_addr << PAGE_SHIFT
    return mmu.shadow_walk(kvm, kvm.vcpus[0].mmu.root, a)[-1]


def host_pfn(kvm, gfn: int, slot_id: int = 0) -> int:
    """The host pfn behind @gfn, populating the host page if needed."""
    slot = kvm.slot(slot_id)
    return kvm.host.hva_to_pfn(slot.gfn_to_hva(gfn))


def fault(gfn: int, **kw) -> mmu.KvmPageFault:
    kw.setdefault("exec", False)
    kw.setdefault("write", False)
    kw.setdefault("present", False)
    return mmu.KvmPageFault(addr=gfn << PAGE_SHIFT, gfn=gfn, **kw)


# --- __kvm_mmu_max_mapping_level() --------------------------------------------------------


def test_max_mapping_level_follows_the_host_page_size() -> None:
    """__kvm_mmu_max_mapping_level(): host_pfn_mapping_level() bounds the level lpage_info allows."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    add_slot(kvm, 1, GiB, GiB, "hugetlb-1g")
    add_slot(kvm, 2, 2 * GiB, 2 * MiB, "4k")
    thp, huge, small = kvm.slot(0), kvm.slot(1), kvm.slot(2)
    # An unpopulated host page counts as 4K.
    assert mmu.kvm_mmu_max_mapping_level(kvm, thp, 0, mmu.PG_LEVEL_NUM) == PG_LEVEL_4K
    host_pfn(kvm, 0)
    assert mmu.kvm_mmu_max_mapping_level(kvm, thp, 0, mmu.PG_LEVEL_NUM) == PG_LEVEL_2M
    host_pfn(kvm, huge.base_gfn, 1)
    assert mmu.kvm_mmu_max_mapping_level(kvm, huge, huge.base_gfn, mmu.PG_LEVEL_NUM) == PG_LEVEL_1G
    assert mmu.kvm_mmu_max_mapping_level(kvm, huge, huge.base_gfn, PG_LEVEL_2M) == PG_LEVEL_2M
    host_pfn(kvm, small.base_gfn, 2)
    assert mmu.kvm_mmu_max_mapping_level(kvm, small, small.base_gfn, mmu.PG_LEVEL_NUM) == PG_LEVEL_4K
    checker.after_operation()


def test_max_mapping_level_drops_to_4k_where_lpage_info_disallows_huge_pages() -> None:
    """__kvm_mmu_max_mapping_level(): disallow_lpage wins over the host level, per huge frame."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    slot = kvm.slot(0)
    host_pfn(kvm, 0)
    host_pfn(kvm, 512)
    kvm_mmu_gfn_disallow_lpage(slot, 7)
    assert mmu.kvm_mmu_max_mapping_level(kvm, slot, 0, mmu.PG_LEVEL_NUM) == PG_LEVEL_4K
    assert mmu.kvm_mmu_max_mapping_level(kvm, slot, 512, mmu.PG_LEVEL_NUM) == PG_LEVEL_2M
    kvm_mmu_gfn_allow_lpage(slot, 7)
    assert mmu.kvm_mmu_max_mapping_level(kvm, slot, 0, mmu.PG_LEVEL_NUM) == PG_LEVEL_2M
    checker.after_operation()


def test_max_mapping_level_of_an_unaligned_slot_edge_is_4k() -> None:
    """kvm_alloc_memslot_metadata(): a huge frame only partly in the slot is disallowed, whatever the host has."""
    kvm, checker = new_vm("tdp")
    kvm.host.add_vma(HVA, 8 * MiB, "thp")
    gpa = 2 * MiB - 64 * 4096
    x86.kvm_set_user_memory_region(kvm, 0, 0, gpa, 4 * MiB, HVA + gpa)
    slot = kvm.slot(0)
    host_pfn(kvm, slot.base_gfn)
    host_pfn(kvm, 512)
    assert kvm.host.host_mapping_level(slot.gfn_to_hva(slot.base_gfn)) == PG_LEVEL_2M
    # gfns 0x1c0..0x1ff: the 2M frame at gfn 0 is only partly in the slot.
    assert mmu.kvm_mmu_max_mapping_level(kvm, slot, slot.base_gfn, mmu.PG_LEVEL_NUM) == PG_LEVEL_4K
    assert mmu.kvm_mmu_max_mapping_level(kvm, slot, 512, mmu.PG_LEVEL_NUM) == PG_LEVEL_2M
    checker.after_operation()


# --- kvm_mmu_hugepage_adjust() ----------------------------------------------------------------


def test_hugepage_adjust_maps_huge_and_aligns_the_pfn() -> None:
    """kvm_mmu_hugepage_adjust(): goal_level = req_level, pfn rounded down to the huge page."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    pfn = host_pfn(kvm, 3)
    f = fault(3, slot=kvm.slot(0), pfn=pfn)
    mmu.kvm_mmu_hugepage_adjust(kvm, f)
    assert (f.req_level, f.goal_level) == (PG_LEVEL_2M, PG_LEVEL_2M)
    assert f.pfn == pfn - 3 and not f.huge_page_disallowed
    checker.after_operation()


def test_hugepage_adjust_keeps_a_dirty_logged_slot_at_4k() -> None:
    """kvm_mmu_hugepage_adjust(): kvm_slot_dirty_track_enabled() returns before req_level is computed."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    set_logging(kvm, 0, True)
    pfn = host_pfn(kvm, 3)
    f = fault(3, write=True, slot=kvm.slot(0), pfn=pfn)
    mmu.kvm_mmu_hugepage_adjust(kvm, f)
    assert (f.req_level, f.goal_level, f.pfn) == (PG_LEVEL_4K, PG_LEVEL_4K, pfn)
    checker.after_operation()


def test_hugepage_adjust_disallows_huge_pages_for_an_exec_fault_under_the_nx_mitigation() -> None:
    """kvm_mmu_hugepage_adjust(): huge_page_disallowed = exec && mitigation; req_level still records 2M."""
    kvm, checker = new_vm("tdp", nx_huge_pages=True)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    pfn = host_pfn(kvm, 3)
    f = fault(3, exec=True, slot=kvm.slot(0), pfn=pfn, nx_huge_page_workaround_enabled=True)
    mmu.kvm_mmu_hugepage_adjust(kvm, f)
    assert f.huge_page_disallowed
    assert (f.req_level, f.goal_level, f.pfn) == (PG_LEVEL_2M, PG_LEVEL_4K, pfn)
    # A read under the same mitigation may still map huge.
    r = fault(3, slot=kvm.slot(0), pfn=pfn, nx_huge_page_workaround_enabled=True)
    mmu.kvm_mmu_hugepage_adjust(kvm, r)
    assert not r.huge_page_disallowed and r.goal_level == PG_LEVEL_2M
    checker.after_operation()


def test_nx_exec_fault_maps_4k_and_tracks_the_page_as_a_possible_huge_page() -> None:
    """kvm_tdp_mmu_map(): the table below a disallowed huge page is nx_huge_page_disallowed and tracked."""
    kvm, checker = new_vm("tdp", nx_huge_pages=True)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0x3000, 0x3001, 4096, "exec")
    assert kvm.stat.pages == [1, 0, 0]
    table = leaf(kvm, 3).sp
    assert table.nx_huge_page_disallowed and table in kvm.possible_nx_huge_pages
    assert kvm.stat.nx_lpage_splits == 1


# --- fast_page_fault() ----------------------------------------------------------------------------


def test_fast_page_fault_restores_w_on_a_dirty_logged_4k_spte_and_logs_the_gfn() -> None:
    """fast_page_fault(): an MMU-writable, write-protected 4K SPTE is made writable; the gfn is marked dirty."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0x5000, 0x5001, 4096, "write")
    set_logging(kvm, 0, True)
    checker.after_operation()
    sptep = leaf(kvm, 5)
    assert not is_writable_pte(sptep.spte) and is_mmu_writable_spte(kvm.masks, sptep.spte)
    stat = kvm.vcpus[0].stat
    taken, fast = stat.pf_taken, stat.pf_fast
    run(kvm, checker, 0, 0x5000, 0x5001, 4096, "write")
    assert (stat.pf_taken, stat.pf_fast) == (taken + 1, fast + 1)
    assert is_writable_pte(sptep.spte)
    assert dirty_bitmap_gfns(kvm.slot(0)) == [5]


def test_fast_page_fault_reports_a_spurious_fault_on_an_spte_that_allows_the_access() -> None:
    """fast_page_fault(): is_access_allowed() on the current SPTE means RET_PF_SPURIOUS (counted as fast)."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0x5000, 0x5001, 4096, "write")
    vcpu = kvm.vcpus[0]
    assert mmu.fast_page_fault(kvm, vcpu, fault(5, write=True, present=True)) == mmu.RET_PF_SPURIOUS
    assert vcpu.stat.pf_fast == 1
    checker.after_operation()


def test_fast_page_fault_refuses_a_huge_spte_in_a_dirty_logged_slot() -> None:
    """fast_page_fault(): W on a large SPTE of a dirty-logged slot is left to the slow path."""
    kvm, checker = new_vm("tdp", eager_page_split=False)
    add_slot(kvm, 0, 0, 2 * MiB, "thp")
    run(kvm, checker, 0, 0, 1, 4096, "write")
    set_logging(kvm, 0, True)
    checker.after_operation()
    sptep = leaf(kvm, 5)
    before = sptep.spte
    assert sptep.sp.role.level == PG_LEVEL_2M and is_mmu_writable_spte(kvm.masks, before)
    vcpu = kvm.vcpus[0]
    assert mmu.fast_page_fault(kvm, vcpu, fault(5, write=True, present=True)) == mmu.RET_PF_INVALID
    assert sptep.spte == before and vcpu.stat.pf_fast == 0
    assert dirty_bitmap_gfns(kvm.slot(0)) == []
    checker.after_operation()


def test_fast_page_fault_refuses_an_spte_that_is_not_mmu_writable() -> None:
    """fast_page_fault(): only MMU-writable SPTEs can be made writable outside mmu_lock."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0x5000, 0x5001, 4096, "write")
    write_protect_gfn(kvm, kvm.vcpus[0].root_mmu.root, 5, PG_LEVEL_4K)
    kvm.kvm_flush_remote_tlbs("write_protect_gfn caller")
    vcpu = kvm.vcpus[0]
    assert mmu.fast_page_fault(kvm, vcpu, fault(5, write=True, present=True)) == mmu.RET_PF_INVALID
    assert not is_writable_pte(leaf(kvm, 5).spte) and vcpu.stat.pf_fast == 0
    checker.after_operation()


def test_fast_page_fault_does_not_handle_reads_of_non_present_sptes_with_ad_bits() -> None:
    """page_fault_can_be_fast(): !present is fast only without A/D bits (access tracking)."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    assert kvm.masks.shadow_accessed_mask
    run(kvm, checker, 0, 0, 1, 4096)
    vcpu = kvm.vcpus[0]
    assert mmu.fast_page_fault(kvm, vcpu, fault(9)) == mmu.RET_PF_INVALID
    assert vcpu.stat.pf_fast == 0


# --- direct_pte_prefetch() ------------------------------------------------------------------------


def test_direct_prefetch_maps_the_rest_of_the_8_entry_group_from_populated_host_pages() -> None:
    """__direct_pte_prefetch(): the non-present entries of the aligned group of 8, prefetched (no A bit)."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    for gfn in range(8, 17):
        host_pfn(kvm, gfn)
    run(kvm, checker, 0, 10 << PAGE_SHIFT, (10 << PAGE_SHIFT) + 1, 4096)
    sp = leaf(kvm, 10).sp
    assert sp.role.direct and sp.role.level == PG_LEVEL_4K
    present = [i for i in range(512) if is_shadow_present_pte(sp.spt[i])]
    assert present == list(range(8, 16))
    assert kvm.stat.pages_4k == 8
    a = kvm.masks.shadow_accessed_mask
    assert sp.spt[10] & a
    for i in (8, 9, 11, 15):
        assert spte_to_pfn(sp.spt[i]) == host_pfn(kvm, i)
        assert not sp.spt[i] & a


def test_direct_prefetch_skips_gfns_whose_host_page_is_not_populated() -> None:
    """gfn_to_page_many_atomic() only returns pages the host already has."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 10 << PAGE_SHIFT, (10 << PAGE_SHIFT) + 1, 4096)
    assert kvm.stat.pages_4k == 1


def test_direct_prefetch_prefetches_nothing_for_a_write_into_a_dirty_logged_slot() -> None:
    """gfn_to_memslot_dirty_bitmap(no_dirty_log=ACC_WRITE): no prefetch into a dirty-logged slot."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    for gfn in range(8, 16):
        host_pfn(kvm, gfn)
    set_logging(kvm, 0, True)
    run(kvm, checker, 0, 10 << PAGE_SHIFT, (10 << PAGE_SHIFT) + 1, 4096, "write")
    assert kvm.stat.pages_4k == 1
    assert dirty_bitmap_gfns(kvm.slot(0)) == [10]


def test_direct_map_drops_a_huge_spte_above_the_goal_with_a_flush() -> None:
    """direct_map(): without the TDP MMU a huge SPTE is not split in place; link_shadow_page() flushes."""
    kvm, checker = new_vm("tdp-legacy", eager_page_split=False)
    add_slot(kvm, 0, 0, 2 * MiB, "thp")
    run(kvm, checker, 0, 0, 1, 4096, "write")
    set_logging(kvm, 0, True)
    flushes = kvm.stat.remote_tlb_flush_requests
    run(kvm, checker, 0, 0x5000, 0x5001, 4096, "write")
    assert kvm.stat.pages == [1, 0, 0]
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1


# --- kvm_zap_gfn_range(), the MMU notifier -----------------------------------------------------------


def test_zap_gfn_range_zaps_leaves_in_both_mmus_and_flushes_once() -> None:
    """kvm_zap_gfn_range(): rmap zap, then kvm_tdp_mmu_zap_leafs(), one kvm_flush_remote_tlbs_range()."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "thp")
    slot = kvm.slot(0)
    ept = EptBuilder(kvm)
    ept.map(0, 0, PG_LEVEL_4K)
    run(kvm, checker, 0, 0, 1, 4096)  # L1: a TDP MMU 2M leaf for gfn 0
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 1, 4096)  # L2: a shadow MMU 4K leaf for L1 gfn 0
    assert kvm.stat.pages == [1, 1, 0]
    assert gfn_to_rmap(0, PG_LEVEL_4K, slot) is not None
    flushes = kvm.stat.remote_tlb_flush_requests
    mmu.kvm_zap_gfn_range(kvm, 0, 512)
    assert kvm.stat.pages == [0, 0, 0]
    assert gfn_to_rmap(0, PG_LEVEL_4K, slot) is None
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()


def test_zap_gfn_range_over_nothing_mapped_does_not_flush() -> None:
    """kvm_zap_gfn_range(): kvm_flush_remote_tlbs_range() only if a leaf was zapped."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 1, 4096)
    mmu.kvm_zap_gfn_range(kvm, 512, 1024)
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.stat.remote_tlb_flush_requests == 0
    checker.after_operation()


def test_host_thp_split_unmaps_the_huge_spte_and_flushes() -> None:
    """__kvm_handle_hva_range() for invalidate_range_start: kvm_unmap_gfn_range(), flush before unlock."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 4 * MiB, 2 * MiB)
    pfn = spte_to_pfn(leaf(kvm, 0).spte)
    assert x86.host_thp_split(kvm, HVA)
    checker.after_operation()
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.stat.remote_tlb_flush_requests == 1
    # The host keeps the frames: the refault maps the same pfn, now with 4K pages.
    run(kvm, checker, 0, 0x3000, 0x3001, 4096)
    assert kvm.stat.pages == [1, 1, 0]
    assert spte_to_pfn(leaf(kvm, 3).spte) == pfn + 3


def test_host_madv_dontneed_unmaps_the_range_and_the_refault_gets_a_new_page() -> None:
    """kvm_mmu_notifier_invalidate_range_start(): zap and flush before the host frees the page."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0, 2 * 4096, 4096)
    old = spte_to_pfn(leaf(kvm, 1).spte)
    x86.host_madv_dontneed(kvm, HVA + 4096, 4096)
    checker.after_operation()
    assert kvm.stat.pages == [1, 0, 0]
    assert not is_shadow_present_pte(leaf(kvm, 1).spte)
    assert kvm.stat.remote_tlb_flush_requests == 1
    run(kvm, checker, 0, 4096, 4097, 4096)
    assert spte_to_pfn(leaf(kvm, 1).spte) != old


def test_invalidating_an_unmapped_hva_range_does_not_flush() -> None:
    """__kvm_handle_hva_range(): flush_on_ret only when a handler zapped something."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    run(kvm, checker, 0, 0, 1, 4096)
    x86.host_madv_dontneed(kvm, HVA + MiB, 4096)
    assert kvm.stat.remote_tlb_flush_requests == 0
    assert kvm.stat.pages == [1, 0, 0]
    checker.after_operation()


# --- MMIO and read-only memslots ------------------------------------------------------------------


def test_an_access_outside_every_slot_is_mmio_and_caches_an_mmio_spte() -> None:
    """tdp_mmu_map_handle_target_level(): no slot means an MMIO SPTE, pf_mmio_spte_created, emulation."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    gfn = (64 * MiB) >> PAGE_SHIFT
    stat = kvm.vcpus[0].stat
    assert mmu.kvm_vcpu_access(kvm, 0, 64 * MiB).outcome == "mmio"
    checker.after_operation()
    spte = leaf(kvm, gfn).spte
    assert is_mmio_spte(kvm.masks, spte) and not is_shadow_present_pte(spte)
    assert get_mmio_spte_gfn(spte) == gfn
    assert get_mmio_spte_generation(spte) == kvm.memslots_generation
    assert (stat.pf_taken, stat.pf_mmio_spte_created, stat.mmio_exits) == (1, 1, 1)
    # handle_mmio_page_fault(): the cached SPTE answers without a page fault.
    assert mmu.kvm_vcpu_access(kvm, 0, 64 * MiB).outcome == "mmio"
    assert (stat.pf_taken, stat.pf_mmio_spte_created, stat.mmio_exits) == (1, 1, 2)
    checker.after_operation()


def test_an_mmio_spte_of_an_old_memslot_generation_takes_the_slow_path() -> None:
    """check_mmio_spte(): a generation mismatch means RET_PF_INVALID and a new MMIO SPTE."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    mmu.kvm_vcpu_access(kvm, 0, 64 * MiB)
    add_slot(kvm, 1, 128 * MiB, 2 * MiB, "4k")
    stat = kvm.vcpus[0].stat
    assert mmu.kvm_vcpu_access(kvm, 0, 64 * MiB).outcome == "mmio"
    assert (stat.pf_taken, stat.pf_mmio_spte_created) == (2, 2)
    assert get_mmio_spte_generation(leaf(kvm, (64 * MiB) >> PAGE_SHIFT).spte) == kvm.memslots_generation
    checker.after_operation()


def test_a_write_to_a_read_only_slot_exits_as_mmio_and_the_spte_stays_read_only() -> None:
    """kvm_handle_error_pfn(): KVM_PFN_ERR_RO_FAULT is emulated; reads map without Host-writable."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k", flags=KVM_MEM_READONLY)
    stat = kvm.vcpus[0].stat
    assert mmu.kvm_vcpu_access(kvm, 0, 0x2000).outcome == "walk"
    r = mmu.kvm_vcpu_access(kvm, 0, 0x2000, write=True)
    assert r.outcome == "mmio" and r.gfn == 2
    assert (stat.mmio_exits, stat.pf_emulate) == (1, 1)
    spte = leaf(kvm, 2).spte
    assert not is_writable_pte(spte) and not is_host_writable_spte(kvm.masks, spte)
    checker.after_operation()


# --- the model's hardware: kvm_vcpu_access() ---------------------------------------------------------


def test_a_second_access_hits_the_tlb_without_a_fault() -> None:
    """Model: kvm_vcpu_access() uses the vCPU TLB first, then walks the SPTEs, and faults only when the walk fails."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    first = mmu.kvm_vcpu_access(kvm, 0, 0x7000)
    second = mmu.kvm_vcpu_access(kvm, 0, 0x7000)
    assert (first.outcome, first.faults) == ("walk", 1)
    assert (second.outcome, second.faults) == ("tlb", 0)
    assert second.pfn == first.pfn
    assert kvm.vcpus[0].stat.pf_taken == 1
    # After a remote flush the SPTE is walked again, still without a fault.
    kvm.kvm_flush_remote_tlbs("test")
    third = mmu.kvm_vcpu_access(kvm, 0, 0x7000)
    assert (third.outcome, third.faults, third.pfn) == ("walk", 0, first.pfn)
    checker.after_operation()


# --- kvm_mmu_track_write() ------------------------------------------------------------------------


def test_an_emulated_write_to_a_write_tracked_guest_table_zaps_the_shadowed_entry() -> None:
    """kvm_mmu_track_write(): mmu_pte_write, the SPTE for the written gpte zapped, flush; the guest sees its change."""
    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 8 * MiB, "4k")
    guest_build_identity_map(
        kvm,
        X86_GPT,
        root_gfn=0x10,
        table_gfns=list(range(0x11, 0x20)),
        gfn_start=0,
        npages=2048,
        page_level=PG_LEVEL_4K,
    )
    x86.kvm_set_cr3(kvm, 0, 0x10)
    data = 0x400 << PAGE_SHIFT  # PD entry 2 -> page table 0x15
    assert mmu.kvm_vcpu_access(kvm, 0, data).gfn == 0x400
    checker.after_operation()
    pd_sp = mmu.shadow_walk(kvm, kvm.vcpus[0].mmu.root, data)[2].sp
    assert (pd_sp.gfn, pd_sp.role.level) == (0x12, PG_LEVEL_2M)
    assert is_shadow_present_pte(pd_sp.spt[2])
    # The guest points PD entry 2 at its last page table (gfns 0x600..0x7ff).
    new_gpte = X86_GPT.make_gpte(0x16, 7)
    flushes = kvm.stat.remote_tlb_flush_requests
    r = mmu.kvm_vcpu_access(kvm, 0, 0x12 << PAGE_SHIFT, write=True, data=(2, new_gpte))
    assert r.outcome == "emulated"
    assert kvm.vcpus[0].stat.pf_emulate == 1
    assert (kvm.stat.mmu_pte_write, kvm.stat.mmu_pde_zapped) == (1, 1)
    assert pd_sp.spt[2] == 0
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert kvm.guest_tables[0x12][2] == new_gpte
    checker.after_operation()
    assert mmu.kvm_vcpu_access(kvm, 0, data).gfn == 0x600
    checker.after_operation()


def test_track_write_does_nothing_without_indirect_shadow_pages() -> None:
    """kvm_mmu_track_write(): !indirect_shadow_pages returns before counting mmu_pte_write."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB, "4k")
    mmu.kvm_mmu_track_write(kvm, kvm.vcpus[0], 0x1000, 8, 1)
    assert kvm.stat.mmu_pte_write == 0
    checker.after_operation()
