"""Page faults, roots, zapping and dirty-log helpers, mirroring arch/x86/kvm/mmu/mmu.c.

This is the MMU's entry layer: kvm_mmu_page_fault() and the three ways KVM
maps guest memory (kvm_tdp_mmu_map() in tdp_mmu.py, direct_map() here,
FNAME(fetch) in paging_tmpl.py), the maximum mapping level, fast page
faults, root loading, kvm_zap_gfn_range(), the MMU notifier's
kvm_unmap_gfn_range(), and the dirty-logging helpers that write-protect or
clear dirty bits on both MMUs.

`kvm_vcpu_access()` is the model's hardware: it runs one guest access on a
vCPU, using its TLB or walking the SPTEs, setting A/D bits like the CPU,
and entering KVM on an EPT violation or page fault.

Model: no concurrency, so is_page_fault_stale() and mmu_invalidate_retry
never fire; the vCPU memory caches never run dry during a fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from kvmsplit import shadow_mmu, tdp_mmu
from kvmsplit.errors import HarnessError, kvm_bug_on
from kvmsplit.memslot import (
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    KvmMemorySlot,
    gfn_round_for_level,
    gfn_to_rmap,
    kvm_slot_dirty_track_enabled,
    lpage_disallowed,
    mark_page_dirty_in_slot,
)
from kvmsplit.mmu_page import KvmMmuPage, kvm_mmu_page_get_gfn, kvm_mmu_page_set_access, sp_ad_disabled
from kvmsplit.rmap import Sptep, rmap_iter
from kvmsplit.role import KvmMmuPageRole, root_role
from kvmsplit.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    SPTE_LEVEL_BITS,
    VMX_EPT_RWX_MASK,
    get_mmio_spte_generation,
    is_access_track_spte,
    is_executable_pte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_mmio_spte,
    make_spte,
    restore_acc_track_spte,
    spte_access,
    spte_ad_enabled,
    spte_to_pfn,
)
from kvmsplit.tlb import TlbEntry

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm, KvmVcpu

RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_INVALID = 3
RET_PF_FIXED = 4
RET_PF_SPURIOUS = 5
# Model: the fault is the guest's own (its page tables deny the access) and is injected.
RET_PF_GUEST = 6

RET_PF_NAMES = {0: "CONTINUE", 1: "RETRY", 2: "EMULATE", 3: "INVALID", 4: "FIXED", 5: "SPURIOUS", 6: "GUEST"}

# max_huge_page_level: 1G with EPT 1G pages or host GBPAGES.
MAX_HUGE_PAGE_LEVEL = KVM_MAX_HUGEPAGE_LEVEL
PG_LEVEL_NUM = 6


def SPTE_INDEX(addr: int, level: int) -> int:
    return (addr >> (PAGE_SHIFT + (level - 1) * SPTE_LEVEL_BITS)) & 511


@attrs.define
class KvmPageFault:
    """struct kvm_page_fault (mmu_internal.h)."""

    addr: int
    exec: bool
    write: bool
    present: bool
    rsvd: bool = False
    user: bool = True
    prefetch: bool = False
    nx_huge_page_workaround_enabled: bool = False
    max_level: int = KVM_MAX_HUGEPAGE_LEVEL
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    huge_page_disallowed: bool = False
    gfn: int = 0
    slot: KvmMemorySlot | None = None
    pfn: int | None = None
    map_writable: bool = False
    write_fault_to_shadow_pgtable: bool = False


# --- mapping level -------------------------------------------------------------


def kvm_mmu_max_mapping_level(kvm: Kvm, slot: KvmMemorySlot, gfn: int, max_level: int) -> int:
    """__kvm_mmu_max_mapping_level(): lpage_info first, then the host page size."""
    max_level = min(max_level, MAX_HUGE_PAGE_LEVEL)
    while max_level > PG_LEVEL_4K:
        if not lpage_disallowed(slot, gfn, max_level):
            break
        max_level -= 1
    if max_level == PG_LEVEL_4K:
        return PG_LEVEL_4K
    host_level = kvm.host.host_mapping_level(slot.gfn_to_hva(gfn))
    return min(host_level, max_level)


def kvm_mmu_hugepage_adjust(kvm: Kvm, fault: KvmPageFault) -> None:
    fault.huge_page_disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
    if fault.max_level == PG_LEVEL_4K:
        return
    if fault.slot is None or fault.pfn is None:
        return
    # Dirty-logged slots are mapped only with 4K pages.
    if kvm_slot_dirty_track_enabled(fault.slot):
        return
    fault.req_level = kvm_mmu_max_mapping_level(kvm, fault.slot, fault.gfn, fault.max_level)
    if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
        return
    fault.goal_level = fault.req_level
    mask = KVM_PAGES_PER_HPAGE(fault.goal_level) - 1
    kvm_bug_on(
        (fault.gfn & mask) != (fault.pfn & mask),
        "kvm_mmu_hugepage_adjust",
        lambda: f"gfn {fault.gfn:#x} and pfn {fault.pfn:#x} are not congruent at level {fault.goal_level}",
    )
    fault.pfn &= ~mask


def disallowed_hugepage_adjust(kvm: Kvm, fault: KvmPageFault, spte: int, cur_level: int) -> None:
    if (
        cur_level > PG_LEVEL_4K
        and cur_level == fault.goal_level
        and is_shadow_present_pte(spte)
        and not is_large_pte(spte)
        and kvm.spte_to_child_sp(spte).nx_huge_page_disallowed
    ):
        # A small SPTE already exists for this pfn because of the NX
        # mitigation: keep mapping small pages here.
        assert fault.pfn is not None
        fault.pfn |= fault.gfn & (KVM_PAGES_PER_HPAGE(cur_level) - KVM_PAGES_PER_HPAGE(cur_level - 1))
        fault.goal_level -= 1


# --- pfn lookup ------------------------------------------------------------------


def gfn_to_memslot_dirty_bitmap(kvm: Kvm, gfn: int, no_dirty_log: bool) -> KvmMemorySlot | None:
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
        return None
    if no_dirty_log and kvm_slot_dirty_track_enabled(slot):
        return None
    return slot


def kvm_faultin_pfn(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    """Look up slot and pfn; RET_PF_EMULATE for MMIO and writes to read-only slots."""
    fault.slot = kvm.gfn_to_memslot(fault.gfn)
    if fault.slot is None:
        if not kvm.config.mmio_caching:
            return RET_PF_EMULATE
        return RET_PF_CONTINUE
    if fault.write and fault.slot.flags & KVM_MEM_READONLY:
        return RET_PF_EMULATE
    fault.pfn = kvm.host.hva_to_pfn(fault.slot.gfn_to_hva(fault.gfn))
    fault.map_writable = not fault.slot.flags & KVM_MEM_READONLY
    return RET_PF_CONTINUE


def gfn_to_pfn_atomic(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> int | None:
    """Model: gfn_to_page_many_atomic()/gfn_to_pfn_memslot_atomic(): only already-populated host pages."""
    hva = slot.gfn_to_hva(gfn)
    found = kvm.host._lookup(hva)
    if found is None:
        return None
    level, base = found
    return base + ((hva >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1))


# --- leaf installation (shadow MMU) ----------------------------------------------


def mmu_set_spte(
    kvm: Kvm,
    slot: KvmMemorySlot | None,
    sptep: Sptep,
    pte_access: int,
    gfn: int,
    pfn: int | None,
    fault: KvmPageFault | None,
    vcpu: KvmVcpu | None = None,
) -> int:
    sp = sptep.sp
    level = sp.role.level
    host_writable = fault is None or fault.map_writable
    prefetch = fault is None or fault.prefetch
    write_fault = fault is not None and fault.write
    was_rmapped = False
    ret = RET_PF_FIXED
    flush = False
    old = sptep.spte
    if is_shadow_present_pte(old):
        if level > PG_LEVEL_4K and not is_large_pte(old):
            # A huge leaf replaces a page table: unlink the child, flush.
            child = kvm.spte_to_child_sp(old)
            shadow_mmu.drop_parent_pte(kvm, child, sptep)
            flush = True
        elif pfn != spte_to_pfn(old):
            shadow_mmu.drop_spte(kvm, sptep)
            flush = True
        else:
            was_rmapped = True
    if slot is None or pfn is None:
        # MMIO: cache the gfn in a non-present SPTE (mark_mmio_spte()).
        if vcpu is not None:
            vcpu.stat.pf_mmio_spte_created += 1
        if kvm.config.mmio_caching:
            sptep.sp.spt[sptep.index] = make_mmio_spte(kvm.masks, kvm.memslots_generation, gfn, pte_access)
        if flush:
            kvm.kvm_flush_remote_tlbs_range(gfn, KVM_PAGES_PER_HPAGE(level), "mmu_set_spte mmio")
        return RET_PF_EMULATE
    wrprot, spte = make_spte(kvm, sp, slot, pte_access, gfn, pfn, sptep.spte, prefetch, False, host_writable)
    if sptep.spte == spte:
        ret = RET_PF_SPURIOUS
    else:
        flush |= shadow_mmu.mmu_spte_update(kvm, sptep, spte)
    if wrprot and write_fault:
        ret = RET_PF_EMULATE
    if flush:
        kvm.kvm_flush_remote_tlbs_range(gfn, KVM_PAGES_PER_HPAGE(level), "mmu_set_spte")
    if not was_rmapped:
        shadow_mmu.rmap_add(kvm, slot, sptep, gfn, pte_access)
    else:
        kvm_mmu_page_set_access(sp, sptep.index, pte_access)
    return ret


def direct_pte_prefetch_many(kvm: Kvm, sp: KvmMmuPage, start: int, end: int) -> int:
    access = sp.role.access
    gfn = kvm_mmu_page_get_gfn(sp, start)
    slot = gfn_to_memslot_dirty_bitmap(kvm, gfn, bool(access & ACC_WRITE_MASK))
    if slot is None:
        return -1
    # gfn_to_page_many_atomic(): nothing if the run leaves the slot, else the
    # already-populated prefix of the run.
    if gfn + (end - start) > slot.end_gfn:
        return -1
    pfns = []
    for i in range(end - start):
        pfn = gfn_to_pfn_atomic(kvm, slot, gfn + i)
        if pfn is None:
            break
        pfns.append(pfn)
    if not pfns:
        return -1
    for i, pfn in enumerate(pfns):
        mmu_set_spte(kvm, slot, Sptep(sp, start + i), access, gfn + i, pfn, None)
    return 0


def _direct_pte_prefetch(kvm: Kvm, sp: KvmMmuPage, sptep: Sptep) -> None:
    kvm_bug_on(not sp.role.direct, "_direct_pte_prefetch", lambda: f"{sp!r} is not direct")
    first = sptep.index & ~7
    start: int | None = None
    for i in range(first, first + 8):
        if is_shadow_present_pte(sp.spt[i]) or i == sptep.index:
            if start is not None:
                if direct_pte_prefetch_many(kvm, sp, start, i) < 0:
                    return
                start = None
        elif start is None:
            start = i
    if start is not None:
        direct_pte_prefetch_many(kvm, sp, start, first + 8)


def direct_pte_prefetch(kvm: Kvm, sptep: Sptep) -> None:
    sp = sptep.sp
    # Without A/D bits a prefetched SPTE cannot be told from an accessed one.
    if sp_ad_disabled(sp):
        return
    if sp.role.level > PG_LEVEL_4K:
        return
    _direct_pte_prefetch(kvm, sp, sptep)


def shadow_walk(kvm: Kvm, root: KvmMmuPage, addr: int, stop_level: int = PG_LEVEL_4K) -> list[Sptep]:
    """Model: for_each_shadow_entry() down to the first non-present or leaf SPTE."""
    out = []
    sp = root
    level = root.role.level
    while level >= stop_level:
        sptep = Sptep(sp, SPTE_INDEX(addr, level))
        out.append(sptep)
        spte = sptep.spte
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            break
        sp = kvm.spte_to_child_sp(spte)
        level -= 1
    return out


def direct_map(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    """Map a gfn through the shadow MMU's direct pages (tdp_mmu=N)."""
    root = vcpu.mmu.root
    assert root is not None
    kvm_mmu_hugepage_adjust(kvm, fault)
    sp = root
    level = root.role.level
    while True:
        sptep = Sptep(sp, SPTE_INDEX(fault.gfn << PAGE_SHIFT, level))
        if fault.nx_huge_page_workaround_enabled:
            disallowed_hugepage_adjust(kvm, fault, sptep.spte, level)
        base_gfn = gfn_round_for_level(fault.gfn, level)
        if level == fault.goal_level:
            break
        child = shadow_mmu.kvm_mmu_get_child_sp(kvm, vcpu, sptep, base_gfn, True, ACC_ALL)
        if child is not None:
            # A huge SPTE here is dropped (with a flush), not split in place.
            shadow_mmu.link_shadow_page(kvm, sptep, child)
            if fault.huge_page_disallowed:
                shadow_mmu.account_nx_huge_page(kvm, child, fault.req_level >= level)
        sp = kvm.spte_to_child_sp(sptep.spte)
        level -= 1
    ret = mmu_set_spte(kvm, fault.slot, sptep, ACC_ALL, base_gfn, fault.pfn, fault, vcpu)
    if ret == RET_PF_SPURIOUS:
        return ret
    direct_pte_prefetch(kvm, sptep)
    return ret


# --- fast page fault ----------------------------------------------------------------


def page_fault_can_be_fast(kvm: Kvm, fault: KvmPageFault) -> bool:
    if fault.rsvd:
        return False
    if not fault.present:
        return not kvm.masks.shadow_accessed_mask  # !kvm_ad_enabled()
    return fault.write


def is_access_allowed(kvm: Kvm, fault: KvmPageFault, spte: int) -> bool:
    if fault.exec:
        return bool(is_executable_pte(kvm.masks, spte))
    if fault.write:
        return bool(is_writable_pte(spte))
    return bool(spte & PT_PRESENT_MASK)


def fast_page_fault(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    """Fix a write-protected or access-tracked SPTE without mmu_lock (mmu.c)."""
    m = kvm.masks
    if not page_fault_can_be_fast(kvm, fault):
        return RET_PF_INVALID
    root = vcpu.mmu.root
    assert root is not None
    walk = shadow_walk(kvm, root, fault.gfn << PAGE_SHIFT)
    ret = RET_PF_INVALID
    sptep = walk[-1]
    spte = sptep.spte
    sp = sptep.sp
    if is_shadow_present_pte(spte) and is_last_spte(spte, sp.role.level):
        if is_access_allowed(kvm, fault, spte):
            ret = RET_PF_SPURIOUS
        else:
            new_spte = spte
            if not m.shadow_accessed_mask and is_access_track_spte(m, spte):
                new_spte = restore_acc_track_spte(m, new_spte)
            refuse = False
            if fault.write and is_mmu_writable_spte(m, spte):
                new_spte |= PT_WRITABLE_MASK
                # A huge SPTE in a dirty-logged slot must be split by the slow path.
                if sp.role.level > PG_LEVEL_4K and kvm_slot_dirty_track_enabled(kvm.gfn_to_memslot(fault.gfn)):
                    refuse = True
            if not refuse and new_spte != spte and is_access_allowed(kvm, fault, new_spte):
                sp.spt[sptep.index] = new_spte
                if is_writable_pte(new_spte) and not is_writable_pte(spte):
                    mark_page_dirty_in_slot(kvm.gfn_to_memslot(fault.gfn), fault.gfn)
                ret = RET_PF_FIXED
    if ret != RET_PF_INVALID:
        vcpu.stat.pf_fast += 1
    return ret


def page_fault_handle_page_track(kvm: Kvm, fault: KvmPageFault) -> bool:
    if fault.rsvd or not fault.present or not fault.write:
        return False
    return shadow_mmu.kvm_gfn_is_write_tracked(kvm, fault.slot, fault.gfn)


def direct_page_fault(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    fault.slot = kvm.gfn_to_memslot(fault.gfn)
    if page_fault_handle_page_track(kvm, fault):
        return RET_PF_EMULATE
    r = fast_page_fault(kvm, vcpu, fault)
    if r != RET_PF_INVALID:
        return r
    r = kvm_faultin_pfn(kvm, vcpu, fault)
    if r != RET_PF_CONTINUE:
        return r
    shadow_mmu.make_mmu_pages_available(kvm)
    r = direct_map(kvm, vcpu, fault)
    kvm.mmu_unlock("direct_page_fault")
    return r


def kvm_tdp_mmu_page_fault(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    fault.slot = kvm.gfn_to_memslot(fault.gfn)
    if page_fault_handle_page_track(kvm, fault):
        return RET_PF_EMULATE
    r = fast_page_fault(kvm, vcpu, fault)
    if r != RET_PF_INVALID:
        return r
    r = kvm_faultin_pfn(kvm, vcpu, fault)
    if r != RET_PF_CONTINUE:
        return r
    r = tdp_mmu.kvm_tdp_mmu_map(kvm, vcpu, fault)
    kvm.mmu_unlock("kvm_tdp_mmu_page_fault")
    return r


def kvm_mmu_do_page_fault(
    kvm: Kvm, vcpu: KvmVcpu, addr: int, write: bool, exec: bool, present: bool, rsvd: bool
) -> int:
    from kvmsplit import paging_tmpl

    fault = KvmPageFault(
        addr=addr,
        exec=exec,
        write=write,
        present=present,
        rsvd=rsvd,
        nx_huge_page_workaround_enabled=kvm.is_nx_huge_page_enabled(),
    )
    vcpu.stat.pf_taken += 1
    ctx = vcpu.mmu
    assert ctx.root is not None
    if ctx.root.role.direct:
        fault.gfn = addr >> PAGE_SHIFT
        if kvm.tdp_mmu_enabled:
            r = kvm_tdp_mmu_page_fault(kvm, vcpu, fault)
        else:
            r = direct_page_fault(kvm, vcpu, fault)
    else:
        r = paging_tmpl.fname_page_fault(kvm, vcpu, fault)
    if r == RET_PF_FIXED:
        vcpu.stat.pf_fixed += 1
    elif r == RET_PF_EMULATE:
        vcpu.stat.pf_emulate += 1
    elif r == RET_PF_SPURIOUS:
        vcpu.stat.pf_spurious += 1
    vcpu.model_last_fault = fault
    return r


# --- roots ----------------------------------------------------------------------


def mmu_root_role(kvm: Kvm, vcpu: KvmVcpu) -> KvmMmuPageRole:
    """Model: kvm_calc_tdp_mmu_root_page_role(), the shadow paging role, kvm_calc_shadow_ept_root_page_role()."""
    if vcpu.guest_mode:
        return root_role(direct=False, guest_mode=True).evolve(efer_nx=False, cr0_wp=False)
    if kvm.config.tdp_enabled:
        return root_role(direct=True, ad_disabled=not kvm.masks.shadow_accessed_mask)
    return root_role(direct=False)


def kvm_mmu_load(kvm: Kvm, vcpu: KvmVcpu) -> None:
    from kvmsplit import paging_tmpl

    ctx = vcpu.mmu
    # kvm_mmu_load() ends with kvm_x86_flush_tlb_current(): nothing cached under
    # the old root is used again.  Model: drop it up front, so the checks at the
    # mmu_lock releases inside the load do not read it as the new root's.
    vcpu.tlb.flush_context(ctx.name)
    role = mmu_root_role(kvm, vcpu)
    if role.direct:
        if kvm.tdp_mmu_enabled:
            ctx.root = tdp_mmu.kvm_tdp_mmu_get_vcpu_root(kvm, role)
        else:
            if shadow_mmu.make_mmu_pages_available(kvm) < 0:
                raise HarnessError("kvm_mmu_load: no shadow pages available for a root (-ENOSPC)")
            ctx.root = shadow_mmu.mmu_alloc_root(kvm, vcpu, ctx, role, 0)
    else:
        if ctx.pgd is None:
            raise HarnessError(f"vcpu {vcpu.vcpu_id}: {ctx.name} has no guest page table root (set CR3/EPTP first)")
        if kvm.gfn_to_memslot(ctx.pgd) is None:
            raise HarnessError(f"vcpu {vcpu.vcpu_id}: guest page table root gfn {ctx.pgd:#x} is in no memslot")
        kvm.shadow_root_allocated = True  # mmu_first_shadow_root_alloc()
        if shadow_mmu.make_mmu_pages_available(kvm) < 0:
            raise HarnessError("kvm_mmu_load: no shadow pages available for a root (-ENOSPC)")
        ctx.root = shadow_mmu.mmu_alloc_root(kvm, vcpu, ctx, role, ctx.pgd)
    kvm.mmu_unlock("mmu_alloc_roots")
    paging_tmpl.kvm_mmu_sync_roots(kvm, vcpu)
    vcpu.tlb.flush_context(ctx.name)


def root_is_obsolete(kvm: Kvm, root: KvmMmuPage) -> bool:
    return shadow_mmu.is_obsolete_sp(kvm, root)


def kvm_mmu_reload(kvm: Kvm, vcpu: KvmVcpu) -> None:
    """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS then kvm_mmu_reload() before entering the guest."""
    ctx = vcpu.mmu
    if ctx.root is not None and root_is_obsolete(kvm, ctx.root):
        shadow_mmu.kvm_mmu_free_roots(kvm, ctx)
    if ctx.root is None:
        kvm_mmu_load(kvm, vcpu)


# --- the model's hardware -------------------------------------------------------------


@attrs.frozen
class AccessResult:
    """Model: what one guest access did."""

    outcome: str  # "tlb", "walk", "emulated", "mmio", "guest_fault"
    gfn: int | None = None
    pfn: int | None = None
    faults: int = 0


def hw_present(kvm: Kvm, spte: int) -> bool:
    if kvm.masks.ept:
        return bool(spte & VMX_EPT_RWX_MASK)
    return bool(spte & PT_PRESENT_MASK)


@attrs.define
class HwWalk:
    ok: bool
    present: bool = False
    rsvd: bool = False
    leaf: Sptep | None = None
    level: int = 0
    path: list[tuple[int, int]] = attrs.field(factory=list)


def hw_walk(kvm: Kvm, root: KvmMmuPage, addr: int, required: int) -> HwWalk:
    """Model: the CPU's walk of the SPTEs for @addr needing @required (ACC_*)."""
    m = kvm.masks
    sp = root
    level = root.role.level
    path: list[tuple[int, int]] = []
    while True:
        sptep = Sptep(sp, SPTE_INDEX(addr, level))
        spte = sptep.spte
        if is_mmio_spte(m, spte):
            return HwWalk(ok=False, present=True, rsvd=True, leaf=sptep, level=level)
        if not hw_present(kvm, spte):
            return HwWalk(ok=False, present=False, leaf=sptep, level=level)
        if is_last_spte(spte, level):
            break
        path.append((level, spte_to_pfn(spte)))
        sp = kvm.spte_to_child_sp(spte)
        level -= 1
    granted = spte_access(m, spte)
    if required & ~granted:
        return HwWalk(ok=False, present=True, leaf=sptep, level=level)
    return HwWalk(ok=True, present=True, leaf=sptep, level=level, path=path)


def leaf_gfn(sptep: Sptep, addr: int) -> int:
    """Model: the gfn a leaf maps for @addr (its base gfn plus the offset in a huge page)."""
    level = sptep.sp.role.level
    base = kvm_mmu_page_get_gfn(sptep.sp, sptep.index)
    return base + ((addr >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1))


def hw_set_accessed_dirty(kvm: Kvm, vcpu: KvmVcpu, sptep: Sptep, addr: int, write: bool) -> None:
    """Model: the CPU sets A (and D on a write) in the leaf; with PML it logs the first write."""
    m = kvm.masks
    spte = sptep.spte
    if not spte_ad_enabled(spte) or not m.shadow_accessed_mask:
        return
    new = spte | m.shadow_accessed_mask
    if write and not spte & m.shadow_dirty_mask:
        new |= m.shadow_dirty_mask
        if kvm.config.cpu_dirty_log_size and not vcpu.guest_mode:
            gfn = leaf_gfn(sptep, addr)
            mark_page_dirty_in_slot(kvm.gfn_to_memslot(gfn), gfn)
    if new != spte:
        sptep.sp.spt[sptep.index] = new


def required_access(write: bool, exec: bool) -> int:
    """Model: every guest access is a CPL3 access (EPT: readable)."""
    acc = ACC_USER_MASK
    if write:
        acc |= ACC_WRITE_MASK
    if exec:
        acc |= ACC_EXEC_MASK
    return acc


MAX_FAULTS_PER_ACCESS = 16


def kvm_vcpu_access(
    kvm: Kvm, vcpu_id: int, addr: int, write: bool = False, exec: bool = False, data: tuple[int, ...] | None = None
) -> AccessResult:
    """Model: vCPU @vcpu_id reads, writes or fetches at @addr.

    @addr is a gpa for L1 under TDP, a gva under shadow paging and an L2 gpa
    in guest mode.  @data=(index, value) writes an 8-byte guest PTE at entry
    @index of the page written, which is how the guest edits its page tables;
    (index, value, width) writes only the first @width bytes of @value.
    """

    vcpu = kvm.vcpu(vcpu_id)
    if not isinstance(addr, int) or addr < 0 or addr >= 1 << 48:
        raise HarnessError(f"kvm_vcpu_access: address {addr!r} is outside the 48-bit address space")
    if write and exec:
        raise HarnessError("kvm_vcpu_access: an access is a write or a fetch, not both")
    if data is not None and not write:
        raise HarnessError("kvm_vcpu_access: data given for a read")
    if data is not None and (not 0 <= data[0] < 512 or not 0 <= data[1] < 1 << 64):
        raise HarnessError(f"kvm_vcpu_access: guest PTE write {data!r} is not (index < 512, u64)")
    if data is not None and len(data) > 2 and data[2] not in (1, 2, 4, 8):
        raise HarnessError(f"kvm_vcpu_access: guest PTE store width {data[2]!r} is not 1, 2, 4 or 8 bytes")
    required = required_access(write, exec)
    faults = 0
    while True:
        kvm_mmu_reload(kvm, vcpu)
        ctx = vcpu.mmu
        assert ctx.root is not None
        cached = vcpu.tlb.translate(ctx.name, addr)
        if cached is not None:
            pfn, access, dirty = cached
            if not required & ~access and (dirty or not write):
                gfn = model_gfn_for_pfn(kvm, vcpu, addr)
                model_guest_store(kvm, gfn, data)
                if write:
                    model_note_write(kvm, gfn)
                return AccessResult("tlb", gfn=gfn, pfn=pfn, faults=faults)
        walk = hw_walk(kvm, ctx.root, addr, required)
        if walk.ok:
            leaf = walk.leaf
            assert leaf is not None
            hw_set_accessed_dirty(kvm, vcpu, leaf, addr, write)
            spte = leaf.spte
            level = walk.level
            gfn = leaf_gfn(leaf, addr)
            vcpu.tlb.fill(
                ctx.name,
                addr,
                TlbEntry(
                    level,
                    spte_to_pfn(spte),
                    spte_access(kvm.masks, spte),
                    bool(spte & kvm.masks.shadow_dirty_mask) or not kvm.masks.shadow_dirty_mask,
                ),
                walk.path,
            )
            model_guest_store(kvm, gfn, data)
            if write:
                model_note_write(kvm, gfn)
            offset = (addr >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1)
            return AccessResult("walk", gfn=gfn, pfn=spte_to_pfn(spte) + offset, faults=faults)
        faults += 1
        if faults > MAX_FAULTS_PER_ACCESS:
            raise HarnessError(f"vcpu {vcpu_id}: access at {addr:#x} still faults after {faults - 1} page faults")
        if walk.rsvd:
            r = handle_mmio_page_fault(kvm, vcpu, walk)
            if r == RET_PF_EMULATE:
                vcpu.stat.mmio_exits += 1
                return AccessResult("mmio", faults=faults)
            # A stale MMIO SPTE: take the normal fault path.
        r = kvm_mmu_do_page_fault(kvm, vcpu, addr, write, exec, walk.present, False)
        if r == RET_PF_GUEST:
            return AccessResult("guest_fault", faults=faults)
        if r == RET_PF_EMULATE:
            fault = vcpu.model_last_fault
            vcpu.stat.insn_emulation += 1
            if fault.slot is None or (write and fault.slot.flags & KVM_MEM_READONLY):
                vcpu.stat.mmio_exits += 1
                return AccessResult("mmio", gfn=fault.gfn, faults=faults)
            if write:
                kvm_vcpu_write_guest(kvm, vcpu, fault.gfn, data)
                model_note_write(kvm, fault.gfn)
            return AccessResult("emulated", gfn=fault.gfn, faults=faults)


def handle_mmio_page_fault(kvm: Kvm, vcpu: KvmVcpu, walk: HwWalk) -> int:
    assert walk.leaf is not None
    spte = walk.leaf.spte
    if get_mmio_spte_generation(spte) != (kvm.memslots_generation & ((1 << 19) - 1)):
        return RET_PF_INVALID
    return RET_PF_EMULATE


def model_gfn_for_pfn(kvm: Kvm, vcpu: KvmVcpu, addr: int) -> int | None:
    """Model: the gfn a TLB hit writes, from the current guest tables (None if unknown)."""
    from kvmsplit import paging_tmpl

    ctx = vcpu.mmu
    assert ctx.root is not None
    if ctx.root.role.direct:
        return addr >> PAGE_SHIFT
    w = paging_tmpl.walk_for(kvm, vcpu, addr)
    return None if w is None else w.gfn


def model_note_write(kvm: Kvm, gfn: int | None) -> None:
    """Model: remember a guest write into a dirty-logged slot until userspace harvests it."""
    if gfn is None:
        return
    slot = kvm.gfn_to_memslot(gfn)
    if slot is not None and slot.dirty_bitmap is not None:
        slot.model_written.add(gfn)


def model_guest_store(kvm: Kvm, gfn: int | None, data: tuple[int, ...] | None) -> None:
    """Model: a guest store that reaches memory without KVM seeing it."""
    if data is None or gfn is None:
        return
    table = kvm.guest_tables.setdefault(gfn, [0] * 512)
    mask = (1 << (8 * (data[2] if len(data) > 2 else 8))) - 1
    table[data[0]] = (table[data[0]] & ~mask) | (data[1] & mask)


def kvm_vcpu_write_guest(kvm: Kvm, vcpu: KvmVcpu, gfn: int, data: tuple[int, ...] | None) -> None:
    """emulator_write_phys(): write memory, log it dirty, tell page tracking."""
    slot = kvm.gfn_to_memslot(gfn)
    model_guest_store(kvm, gfn, data)
    mark_page_dirty_in_slot(slot, gfn)
    if data is None:
        kvm_mmu_track_write(kvm, vcpu, gfn << PAGE_SHIFT, 8, 0)
        return
    # mmu_pte_write_fetch_gpte(): with PAE paging (long mode included) a
    # 4-byte store is widened to its whole 8-byte gpte; only 4- and 8-byte
    # stores read back a new gpte, any other width zaps with gentry 0.
    nbytes = data[2] if len(data) > 2 else 8
    if nbytes == 4:
        nbytes = 8
    gentry = kvm.guest_tables[gfn][data[0]] if nbytes in (4, 8) else 0
    kvm_mmu_track_write(kvm, vcpu, (gfn << PAGE_SHIFT) + data[0] * 8, nbytes, gentry)


# --- emulated writes to shadowed page tables -------------------------------------------


def detect_write_misaligned(sp: KvmMmuPage, gpa: int, nbytes: int) -> bool:
    offset = gpa & ((1 << PAGE_SHIFT) - 1)
    pte_size = 4 if sp.role.has_4_byte_gpte else 8
    if not (offset & (pte_size - 1)) and nbytes == 1:
        return False
    misaligned = (offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)
    misaligned |= nbytes < 4
    return bool(misaligned)


def detect_write_flooding(sp: KvmMmuPage) -> bool:
    # 4K pages can go unsync instead.
    if sp.role.level == PG_LEVEL_4K:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= 3


def kvm_mmu_track_write(kvm: Kvm, vcpu: KvmVcpu, gpa: int, nbytes: int, gentry: int = 0) -> None:
    """Zap the SPTEs that shadow the guest PTE just written (mmu.c)."""
    if not kvm.indirect_shadow_pages:
        return
    gfn = gpa >> PAGE_SHIFT
    invalid_list: list[KvmMmuPage] = []
    flush = False
    kvm.stat.mmu_pte_write += 1
    for sp in shadow_mmu.for_each_gfn_valid_sp_with_gptes(kvm, gfn):
        if shadow_mmu.is_obsolete_sp(kvm, sp):
            continue
        if detect_write_misaligned(sp, gpa, nbytes) or detect_write_flooding(sp):
            shadow_mmu.kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            kvm.stat.mmu_flooded += 1
            continue
        index = (gpa & ((1 << PAGE_SHIFT) - 1)) >> 3
        sptep = Sptep(sp, index)
        entry = sptep.spte
        shadow_mmu.mmu_page_zap_pte(kvm, sp, sptep, None)
        if gentry and sp.role.level != PG_LEVEL_4K:
            kvm.stat.mmu_pde_zapped += 1
        if is_shadow_present_pte(entry):
            flush = True
    shadow_mmu.kvm_mmu_remote_flush_or_zap(kvm, invalid_list, flush)
    kvm.mmu_unlock("kvm_mmu_track_write")


# --- zapping and the MMU notifier ----------------------------------------------------


def _kvm_zap_rmap(kvm: Kvm, rmap_head, slot: KvmMemorySlot, gfn: int, level: int) -> bool:  # type: ignore[no-untyped-def]
    return shadow_mmu.kvm_zap_all_rmap_sptes(kvm, rmap_head)


def kvm_zap_gfn_range(kvm: Kvm, gfn_start: int, gfn_end: int) -> None:
    """Zap every leaf mapping gfns [gfn_start, gfn_end) in both MMUs, then flush."""
    if not isinstance(gfn_start, int) or not isinstance(gfn_end, int) or gfn_end <= gfn_start:
        raise HarnessError(f"kvm_zap_gfn_range: empty or bad range [{gfn_start!r}, {gfn_end!r})")
    flush = False
    if kvm.kvm_memslots_have_rmaps():
        for slot in list(kvm.memslots.values()):
            start = max(gfn_start, slot.base_gfn)
            end = min(gfn_end, slot.end_gfn)
            if start >= end:
                continue
            flush |= shadow_mmu.walk_slot_rmaps(
                kvm, slot, _kvm_zap_rmap, PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL, start, end - 1
            )
    if kvm.tdp_mmu_enabled:
        flush = tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, gfn_start, gfn_end, flush)
    if flush:
        kvm.kvm_flush_remote_tlbs_range(gfn_start, gfn_end - gfn_start, "kvm_zap_gfn_range")
    kvm.mmu_unlock("kvm_zap_gfn_range")


def kvm_unmap_gfn_range(kvm: Kvm, slot: KvmMemorySlot, start: int, end: int) -> bool:
    """The MMU notifier's handler: zap leaves in [start, end) of @slot; return flush."""
    flush = False
    if kvm.kvm_memslots_have_rmaps():
        flush = shadow_mmu.walk_slot_rmaps(
            kvm, slot, _kvm_zap_rmap, PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL, start, end - 1
        )
    if kvm.tdp_mmu_enabled:
        flush = tdp_mmu.kvm_tdp_mmu_unmap_gfn_range(kvm, slot, start, end, flush)
    return flush


def kvm_mmu_notifier_invalidate_range(kvm: Kvm, hva_start: int, hva_end: int) -> None:
    """__kvm_handle_hva_range() for invalidate_range_start: zap, flush before unlock."""
    ret = False
    found = False
    for slot in list(kvm.memslots.values()):
        s_end = slot.userspace_addr + (slot.npages << PAGE_SHIFT)
        hs = max(hva_start, slot.userspace_addr)
        he = min(hva_end, s_end)
        if hs >= he:
            continue
        found = True
        gfn_start = slot.hva_to_gfn(hs)
        gfn_end = slot.hva_to_gfn(he + (1 << PAGE_SHIFT) - 1)
        ret |= kvm_unmap_gfn_range(kvm, slot, gfn_start, gfn_end)
    if ret:
        kvm.kvm_flush_remote_tlbs("kvm_mmu_notifier_invalidate_range_start")
    if found:
        kvm.mmu_unlock("kvm_mmu_notifier_invalidate_range_start")


# --- dirty logging helpers -------------------------------------------------------------


def slot_rmap_write_protect(kvm: Kvm, rmap_head, slot: KvmMemorySlot, gfn: int, level: int) -> bool:  # type: ignore[no-untyped-def]
    return shadow_mmu.rmap_write_protect(kvm, rmap_head, False)


def kvm_mmu_slot_remove_write_access(kvm: Kvm, slot: KvmMemorySlot, start_level: int) -> None:
    if kvm.kvm_memslots_have_rmaps():
        shadow_mmu.walk_slot_rmaps(
            kvm, slot, slot_rmap_write_protect, start_level, KVM_MAX_HUGEPAGE_LEVEL, slot.base_gfn, slot.end_gfn - 1
        )
        kvm.mmu_unlock("kvm_mmu_slot_remove_write_access rmaps")
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_wrprot_slot(kvm, slot, start_level)
        kvm.mmu_unlock("kvm_mmu_slot_remove_write_access tdp")


def kvm_mmu_slot_leaf_clear_dirty(kvm: Kvm, slot: KvmMemorySlot) -> None:
    if kvm.kvm_memslots_have_rmaps():
        shadow_mmu.walk_slot_rmaps(
            kvm, slot, shadow_mmu._rmap_clear_dirty, PG_LEVEL_4K, PG_LEVEL_4K, slot.base_gfn, slot.end_gfn - 1
        )
        kvm.mmu_unlock("kvm_mmu_slot_leaf_clear_dirty rmaps")
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_clear_dirty_slot(kvm, slot)
        kvm.mmu_unlock("kvm_mmu_slot_leaf_clear_dirty tdp")


def _mask_gfns(slot: KvmMemorySlot, gfn_offset: int, mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(slot.base_gfn + gfn_offset + low.bit_length() - 1)
        mask ^= low
    return out


def kvm_mmu_write_protect_pt_masked(kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int) -> None:
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(kvm, slot, slot.base_gfn + gfn_offset, mask, True)
    if not kvm.kvm_memslots_have_rmaps():
        return
    for gfn in _mask_gfns(slot, gfn_offset, mask):
        shadow_mmu.rmap_write_protect(kvm, gfn_to_rmap(gfn, PG_LEVEL_4K, slot), False)


def kvm_mmu_clear_dirty_pt_masked(kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int) -> None:
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(kvm, slot, slot.base_gfn + gfn_offset, mask, False)
    if not kvm.kvm_memslots_have_rmaps():
        return
    for gfn in _mask_gfns(slot, gfn_offset, mask):
        head = gfn_to_rmap(gfn, PG_LEVEL_4K, slot)
        if head is not None:
            shadow_mmu._rmap_clear_dirty(kvm, head, slot)


def kvm_arch_mmu_enable_log_dirty_pt_masked(kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int) -> None:
    """Re-arm dirty logging for the gfns in @mask (mmu.c)."""
    from kvmsplit import split

    if kvm.kvm_dirty_log_manual_protect_and_init_set():
        start = slot.base_gfn + gfn_offset + ((mask & -mask).bit_length() - 1)
        end = slot.base_gfn + gfn_offset + (mask.bit_length() - 1)
        if kvm.eager_page_split:
            split.kvm_mmu_try_split_huge_pages(kvm, slot, start, end + 1, PG_LEVEL_4K)
        kvm_mmu_slot_gfn_write_protect(kvm, slot, start, 2, deferred=True)
        # Write-protect the end's huge page too when it is a different one.
        if _align_up(start << PAGE_SHIFT, 1 << 21) != _align_up(end << PAGE_SHIFT, 1 << 21):
            kvm_mmu_slot_gfn_write_protect(kvm, slot, end, 2, deferred=True)
    if kvm.config.cpu_dirty_log_size:
        kvm_mmu_clear_dirty_pt_masked(kvm, slot, gfn_offset, mask)
    else:
        kvm_mmu_write_protect_pt_masked(kvm, slot, gfn_offset, mask)


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def kvm_mmu_slot_gfn_write_protect(
    kvm: Kvm, slot: KvmMemorySlot, gfn: int, min_level: int, deferred: bool = False
) -> bool:
    return shadow_mmu.kvm_mmu_slot_gfn_write_protect(kvm, slot, gfn, min_level, deferred)


def kvm_mmu_zap_collapsible_spte(kvm: Kvm, rmap_head, slot: KvmMemorySlot, gfn: int, level: int) -> bool:  # type: ignore[no-untyped-def]
    need_tlb_flush = False
    restart = True
    while restart:
        restart = False
        for sptep in rmap_iter(rmap_head):
            sp = sptep.sp
            # Indirect 4K pages follow the guest's 4K mappings: leave them.
            if sp.role.direct and sp.role.level < kvm_mmu_max_mapping_level(kvm, slot, sp.gfn, PG_LEVEL_NUM):
                shadow_mmu.drop_spte(kvm, sptep)
                need_tlb_flush = True
                restart = True
                break
    return need_tlb_flush


def kvm_mmu_zap_collapsible_sptes(kvm: Kvm, slot: KvmMemorySlot) -> None:
    """Let huge pages come back after dirty logging stops (B: zap, refault)."""
    if kvm.kvm_memslots_have_rmaps():
        if shadow_mmu.walk_slot_rmaps(
            kvm,
            slot,
            kvm_mmu_zap_collapsible_spte,
            PG_LEVEL_4K,
            KVM_MAX_HUGEPAGE_LEVEL - 1,
            slot.base_gfn,
            slot.end_gfn - 1,
        ):
            kvm.kvm_flush_remote_tlbs_memslot(slot, "kvm_mmu_zap_collapsible_sptes")
        kvm.mmu_unlock("kvm_rmap_zap_collapsible_sptes")
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_zap_collapsible_sptes(kvm, slot)
        kvm.mmu_unlock("kvm_tdp_mmu_zap_collapsible_sptes")


def kvm_mmu_zap_all(kvm: Kvm) -> None:
    """kvm_arch_flush_shadow_all(): zap every page, then every TDP root."""
    invalid_list: list[KvmMmuPage] = []
    restart = True
    while restart:
        restart = False
        for sp in list(kvm.active_mmu_pages):
            if sp not in kvm.active_mmu_pages:
                continue
            unstable, _ = shadow_mmu._kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            if unstable:
                restart = True
                break
    shadow_mmu.kvm_mmu_commit_zap_page(kvm, invalid_list)
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_zap_all(kvm)
    kvm.mmu_unlock("kvm_mmu_zap_all")


# --- page aging (the MMU notifier's clear_young) ---------------------------------------


def mmu_spte_age(kvm: Kvm, sptep: Sptep) -> bool:
    """Clear the accessed state of a leaf; return whether it was accessed (mmu.c)."""
    from kvmsplit.spte import is_accessed_spte, mark_spte_for_access_track

    m = kvm.masks
    spte = sptep.spte
    if not is_accessed_spte(m, spte):
        return False
    if spte_ad_enabled(spte):
        sptep.sp.spt[sptep.index] = spte & ~m.shadow_accessed_mask
    else:
        sptep.sp.spt[sptep.index] = mark_spte_for_access_track(m, spte)
    return True


def kvm_age_gfn(kvm: Kvm, slot: KvmMemorySlot, start: int, end: int) -> bool:
    """clear_young for gfns [start, end): clear A bits, no TLB flush (kvm_age_gfn())."""
    young = False
    if kvm.kvm_memslots_have_rmaps():
        for level in range(PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL + 1):
            for _, head in shadow_mmu.rmap_sptes(kvm, slot, level, start, end - 1):
                for sptep in list(rmap_iter(head)):
                    young |= mmu_spte_age(kvm, sptep)
    if kvm.tdp_mmu_enabled:
        young |= tdp_mmu.kvm_tdp_mmu_age_gfn_range(kvm, start, end)
    return young


def kvm_mmu_notifier_clear_young(kvm: Kvm, hva_start: int, hva_end: int) -> bool:
    young = False
    for slot in list(kvm.memslots.values()):
        s_end = slot.userspace_addr + (slot.npages << PAGE_SHIFT)
        hs, he = max(hva_start, slot.userspace_addr), min(hva_end, s_end)
        if hs < he:
            young |= kvm_age_gfn(kvm, slot, slot.hva_to_gfn(hs), slot.hva_to_gfn(he + (1 << PAGE_SHIFT) - 1))
    return young
