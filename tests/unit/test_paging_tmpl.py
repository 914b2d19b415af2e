"""Unit tests for kvmsplit/paging_tmpl.py (arch/x86/kvm/mmu/paging_tmpl.h and the sync code of mmu.c).

Shadow paging of L1 (PTTYPE 64) and nested EPT for L2 (PTTYPE_EPT), driven
through guest accesses; every named invariant runs after each step.
"""

from __future__ import annotations

from kvmsplit import mmu, shadow_mmu, x86
from kvmsplit.guest import X86_GPT, guest_build_identity_map
from kvmsplit.memslot import gfn_to_rmap, lpage_disallowed
from kvmsplit.rmap import rmap_iter
from kvmsplit.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    is_executable_pte,
    is_large_pte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from tests.helpers import EptBuilder, MiB, add_slot, new_vm, run

# The guest's identity map of 8 MiB: PML4 at 0x10, PDPT 0x11, PD 0x12 and,
# with 4K pages, page tables 0x13..0x16 (512 gfns each).  DATA_GFN is mapped
# by entry 0 of page table 0x15, which is entry 2 of the PD.
ROOT_GFN = 0x10
TABLE_GFNS = list(range(0x11, 0x20))
DATA_GFN = 0x400
PT_OF_DATA = 0x15
GUEST_ACCESSED = 1 << 5


def shadow_vm(page_level: int = PG_LEVEL_4K, backing: str = "4k", access: int = ACC_ALL):
    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 8 * MiB, backing)
    guest_build_identity_map(
        kvm,
        X86_GPT,
        root_gfn=ROOT_GFN,
        table_gfns=TABLE_GFNS,
        gfn_start=0,
        npages=2048,
        page_level=page_level,
        access=access,
    )
    x86.kvm_set_cr3(kvm, 0, ROOT_GFN)
    return kvm, checker


def walk(kvm, addr: int):
    return mmu.shadow_walk(kvm, kvm.vcpus[0].mmu.root, addr)


def host_pfn(kvm, gfn: int) -> int:
    slot = kvm.gfn_to_memslot(gfn)
    return kvm.host.hva_to_pfn(slot.gfn_to_hva(gfn))


# --- FNAME(fetch) -----------------------------------------------------------------------------


def test_shadow_paging_builds_one_indirect_page_per_guest_table() -> None:
    """FNAME(fetch): each guest table on the walk gets an indirect shadow page at its gfn."""
    kvm, checker = shadow_vm()
    r = mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << PAGE_SHIFT)
    checker.after_operation()
    assert (r.outcome, r.gfn) == ("walk", DATA_GFN)
    path = walk(kvm, DATA_GFN << PAGE_SHIFT)
    assert [(s.sp.role.level, s.sp.gfn, s.sp.role.direct) for s in path] == [
        (4, ROOT_GFN, False),
        (3, 0x11, False),
        (2, 0x12, False),
        (1, PT_OF_DATA, False),
    ]
    leaf = path[-1]
    assert leaf.sp.shadowed_translation[leaf.index] == (DATA_GFN << PAGE_SHIFT) | ACC_ALL
    assert spte_to_pfn(leaf.spte) == host_pfn(kvm, DATA_GFN)
    # account_shadowed(): the upper-level tables are write-tracked, the 4K one is not.
    slot = kvm.slot(0)
    for gfn in (ROOT_GFN, 0x11, 0x12):
        assert shadow_mmu.kvm_gfn_is_write_tracked(kvm, slot, gfn)
    assert not shadow_mmu.kvm_gfn_is_write_tracked(kvm, slot, PT_OF_DATA)
    assert kvm.indirect_shadow_pages == 4


def test_a_guest_2m_page_on_4k_host_memory_gets_a_direct_page_with_the_guest_access() -> None:
    """FNAME(fetch): below the guest's huge page KVM maps with a direct shadow page (role.access from the gpte)."""
    access = ACC_USER_MASK | ACC_EXEC_MASK
    kvm, checker = shadow_vm(page_level=PG_LEVEL_2M, access=access)
    addr = (DATA_GFN + 3) << PAGE_SHIFT
    r = mmu.kvm_vcpu_access(kvm, 0, addr)
    checker.after_operation()
    assert r.gfn == DATA_GFN + 3
    path = walk(kvm, addr)
    assert [s.sp.role.direct for s in path] == [False, False, False, True]
    direct = path[-1].sp
    assert (direct.role.level, direct.gfn, direct.role.access) == (PG_LEVEL_4K, DATA_GFN, access)
    assert not is_large_pte(path[-1].spte) and not is_writable_pte(path[-1].spte)
    assert kvm.stat.pages == [1, 0, 0]


def test_a_guest_2m_page_on_thp_host_memory_maps_one_2m_spte() -> None:
    """FNAME(fetch) -> kvm_mmu_hugepage_adjust(): max_level is the guest's level, the host's page is 2M."""
    kvm, checker = shadow_vm(page_level=PG_LEVEL_2M, backing="thp")
    addr = (DATA_GFN + 3) << PAGE_SHIFT
    mmu.kvm_vcpu_access(kvm, 0, addr)
    checker.after_operation()
    leaf = walk(kvm, addr)[-1]
    assert leaf.sp.role.level == PG_LEVEL_2M and is_large_pte(leaf.spte)
    assert kvm.stat.pages == [0, 1, 0]
    # The frame holding the guest's tables is shadowed, so it may not be mapped huge.
    assert lpage_disallowed(kvm.slot(0), ROOT_GFN, PG_LEVEL_2M)


# --- FNAME(page_fault): the guest's own faults --------------------------------------------------


def test_an_access_the_guest_tables_deny_is_the_guests_fault() -> None:
    """FNAME(page_fault): walk_addr fails, the fault is injected (pf_guest), no SPTE is made."""
    kvm, checker = shadow_vm(access=ACC_USER_MASK | ACC_EXEC_MASK)
    stat = kvm.vcpus[0].stat
    addr = DATA_GFN << PAGE_SHIFT
    assert mmu.kvm_vcpu_access(kvm, 0, addr, write=True).outcome == "guest_fault"
    assert stat.pf_guest == 1 and kvm.stat.pages == [0, 0, 0]
    # Beyond the guest's identity map nothing is present.
    assert mmu.kvm_vcpu_access(kvm, 0, 64 * MiB).outcome == "guest_fault"
    assert stat.pf_guest == 2
    # A read the tables allow is fine.
    assert mmu.kvm_vcpu_access(kvm, 0, addr).outcome == "walk"
    checker.after_operation()


# --- unsync and resync ---------------------------------------------------------------------------


def test_a_guest_write_to_a_4k_table_unsyncs_it_until_the_guest_flushes_its_tlb() -> None:
    """mmu_try_to_unsync_pages() lets the guest write its 4K table; kvm_mmu_sync_roots() resyncs on CR3 reload."""
    kvm, checker = shadow_vm()
    data = DATA_GFN << PAGE_SHIFT
    old_pfn = host_pfn(kvm, DATA_GFN)
    assert mmu.kvm_vcpu_access(kvm, 0, data).pfn == old_pfn
    checker.after_operation()
    pt_sp = walk(kvm, data)[-1].sp
    pd_sp = walk(kvm, data)[-2].sp
    assert pt_sp.gfn == PT_OF_DATA and not pt_sp.unsync

    # The guest repoints entry 0 of its page table, writing the table directly.
    new_gfn = 0x500
    w = mmu.kvm_vcpu_access(kvm, 0, PT_OF_DATA << PAGE_SHIFT, write=True, data=(0, X86_GPT.make_gpte(new_gfn, ACC_ALL)))
    checker.after_operation()
    assert w.outcome == "walk"
    assert pt_sp.unsync and kvm.stat.mmu_unsync == 1
    assert pd_sp.unsync_child_bitmap == 1 << 2
    assert is_writable_pte(walk(kvm, PT_OF_DATA << PAGE_SHIFT)[-1].spte)

    # A KVM flush is not a guest flush: the stale SPTE still maps the old page.
    kvm.kvm_flush_remote_tlbs("test")
    r = mmu.kvm_vcpu_access(kvm, 0, data)
    assert (r.outcome, r.pfn) == ("walk", old_pfn)
    checker.after_operation()

    tlb_flushes = kvm.vcpus[0].stat.tlb_flush
    x86.kvm_guest_tlb_flush(kvm, 0)
    checker.after_operation()
    assert not pt_sp.unsync and kvm.stat.mmu_unsync == 0
    assert pd_sp.unsync_child_bitmap == 0
    assert kvm.vcpus[0].stat.tlb_flush == tlb_flushes + 1
    # mmu_sync_children() write-protected the table again before syncing it.
    assert not is_writable_pte(walk(kvm, PT_OF_DATA << PAGE_SHIFT)[-1].spte)
    r = mmu.kvm_vcpu_access(kvm, 0, data)
    assert (r.outcome, r.gfn, r.pfn) == ("walk", new_gfn, host_pfn(kvm, new_gfn))
    checker.after_operation()


def test_a_cr3_reload_with_nothing_unsync_only_flushes_the_guest_tlb() -> None:
    """kvm_mmu_sync_roots(): !is_unsync_root() returns at once; the reload still flushes the TLB."""
    kvm, checker = shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << PAGE_SHIFT)
    spt = list(walk(kvm, DATA_GFN << PAGE_SHIFT)[-1].sp.spt)
    x86.kvm_guest_tlb_flush(kvm, 0)
    assert not kvm.vcpus[0].tlb.leaves
    assert list(walk(kvm, DATA_GFN << PAGE_SHIFT)[-1].sp.spt) == spt
    assert kvm.stat.remote_tlb_flush_requests == 0
    checker.after_operation()


# --- nested EPT (PTTYPE_EPT) ---------------------------------------------------------------------


def nested_vm():
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "4k")
    return kvm, checker, EptBuilder(kvm)


def test_nested_shadow_pages_are_guest_mode_and_map_ept_read_as_user() -> None:
    """FNAME(gpte_access) for EPT: R is ACC_USER_MASK, W and X their own; pages have role.guest_mode."""
    kvm, checker, ept = nested_vm()
    ept.map(0, 0x10, PG_LEVEL_4K, access=ACC_USER_MASK)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    r = mmu.kvm_vcpu_access(kvm, 0, 0x10)
    checker.after_operation()
    assert (r.outcome, r.gfn) == ("walk", 0x10)
    path = walk(kvm, 0)
    assert all(s.sp.role.guest_mode and not s.sp.role.direct for s in path)
    leaf = path[-1]
    assert leaf.sp.shadowed_translation[leaf.index] & ACC_ALL == ACC_USER_MASK
    assert leaf.spte & kvm.masks.shadow_user_mask
    assert not is_writable_pte(leaf.spte) and not is_executable_pte(kvm.masks, leaf.spte)
    assert mmu.kvm_vcpu_access(kvm, 0, 0x10, write=True).outcome == "guest_fault"
    assert mmu.kvm_vcpu_access(kvm, 0, 0x10, exec=True).outcome == "guest_fault"
    assert kvm.vcpus[0].stat.pf_guest == 2
    checker.after_operation()


def test_nested_ept_execute_permission_maps_executable() -> None:
    """FNAME(gpte_access) for EPT: X becomes ACC_EXEC_MASK, so an L2 fetch is allowed."""
    kvm, checker, ept = nested_vm()
    ept.map(0, 0x10, PG_LEVEL_4K, access=ACC_USER_MASK | ACC_EXEC_MASK)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    assert mmu.kvm_vcpu_access(kvm, 0, 0x10, exec=True).outcome == "walk"
    assert is_executable_pte(kvm.masks, walk(kvm, 0)[-1].spte)
    checker.after_operation()


def test_l1_and_l2_use_separate_mmus() -> None:
    """nested_vmx_enter(): guest_mmu serves L2 while root_mmu keeps L1's TDP root."""
    kvm, checker, ept = nested_vm()
    ept.map(0, 0x10, PG_LEVEL_4K)
    run(kvm, checker, 0, 0, 1, 4096)
    l1_root = kvm.vcpus[0].root_mmu.root
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 1, 4096)
    vcpu = kvm.vcpus[0]
    assert vcpu.mmu is vcpu.guest_mmu and vcpu.root_mmu.root is l1_root
    assert vcpu.guest_mmu.root.role.guest_mode and not l1_root.role.guest_mode
    assert kvm.shadow_root_allocated
    # L1's TDP MMU maps gfn 0, L2's shadow MMU maps L1 gfn 0x10: one 4K leaf each.
    assert kvm.stat.pages == [2, 0, 0]
    assert mmu.shadow_walk(kvm, l1_root, 0)[-1].sp.tdp_mmu_page
    assert not walk(kvm, 0)[-1].sp.tdp_mmu_page


# --- FNAME(pte_prefetch) ---------------------------------------------------------------------------


def test_pte_prefetch_maps_accessed_neighbours_in_the_group_of_8() -> None:
    """FNAME(pte_prefetch): present, accessed gptes next to the fault are mapped when their host page exists."""
    kvm, checker = shadow_vm()
    for gfn in range(DATA_GFN, DATA_GFN + 9):
        host_pfn(kvm, gfn)
    mmu.kvm_vcpu_access(kvm, 0, (DATA_GFN + 3) << PAGE_SHIFT)
    checker.after_operation()
    sp = walk(kvm, DATA_GFN << PAGE_SHIFT)[-1].sp
    present = [i for i in range(512) if is_shadow_present_pte(sp.spt[i])]
    assert present == list(range(8))
    for i in present:
        assert spte_to_pfn(sp.spt[i]) == host_pfn(kvm, DATA_GFN + i)
        assert sp.shadowed_translation[i] >> PAGE_SHIFT == DATA_GFN + i
    # One rmap entry per prefetched SPTE.
    assert kvm.stat.pages_4k == 8


def test_pte_prefetch_stops_at_a_gpte_the_guest_never_accessed() -> None:
    """FNAME(prefetch_invalid_gpte): a gpte without the accessed bit ends the prefetch loop."""
    kvm, checker = shadow_vm()
    for gfn in range(DATA_GFN, DATA_GFN + 8):
        host_pfn(kvm, gfn)
    kvm.guest_tables[PT_OF_DATA][5] &= ~GUEST_ACCESSED
    mmu.kvm_vcpu_access(kvm, 0, (DATA_GFN + 3) << PAGE_SHIFT)
    checker.after_operation()
    sp = walk(kvm, DATA_GFN << PAGE_SHIFT)[-1].sp
    assert [i for i in range(8) if is_shadow_present_pte(sp.spt[i])] == [0, 1, 2, 3, 4]


def test_nested_pte_prefetch_uses_the_ept_format() -> None:
    """FNAME(pte_prefetch) for PTTYPE_EPT: neighbouring EPT gptes of L2 are prefetched too."""
    kvm, checker, ept = nested_vm()
    for i in range(8):
        ept.map(i << PAGE_SHIFT, 0x20 + i, PG_LEVEL_4K)
        host_pfn(kvm, 0x20 + i)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    mmu.kvm_vcpu_access(kvm, 0, 0x2000)
    checker.after_operation()
    sp = walk(kvm, 0)[-1].sp
    assert sp.role.guest_mode
    assert [i for i in range(512) if is_shadow_present_pte(sp.spt[i])] == list(range(8))
    for i in range(8):
        assert sp.shadowed_translation[i] >> PAGE_SHIFT == 0x20 + i
        assert [s.index for s in rmap_iter(gfn_to_rmap(0x20 + i, PG_LEVEL_4K, kvm.slot(0)))] == [i]
