"""Shadowing guest page tables, mirroring arch/x86/kvm/mmu/paging_tmpl.h and the sync code of mmu.c.

The template is instantiated twice in the kernel: PTTYPE 64 for shadow
paging of L1 and PTTYPE_EPT for L1's EPT tables of an L2 guest
(`role.guest_mode`).  Here the format is a `GptFormat` value picked from the
role.  FNAME(fetch) builds indirect shadow pages for the guest's tables,
direct ones below a guest huge page, and maps the leaf with mmu_set_spte().

Model: there is no concurrency, so FNAME(gpte_changed) never sees a change
and is not modelled; INVLPG (kvm_mmu_invalidate_addr()) is not modelled: a
guest TLB flush is a CR3 reload or INVEPT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmsplit import shadow_mmu
from kvmsplit.errors import kvm_bug_on
from kvmsplit.guest import EPT_GPT, X86_GPT, GptFormat, GuestWalker, guest_walk
from kvmsplit.memslot import gfn_round_for_level
from kvmsplit.mmu import (
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_GUEST,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    SPTE_INDEX,
    KvmPageFault,
    _direct_pte_prefetch,
    disallowed_hugepage_adjust,
    gfn_to_memslot_dirty_bitmap,
    gfn_to_pfn_atomic,
    kvm_faultin_pfn,
    kvm_mmu_hugepage_adjust,
    mmu_set_spte,
    page_fault_handle_page_track,
    required_access,
)
from kvmsplit.mmu_page import KvmMmuPage, kvm_mmu_page_get_access, kvm_mmu_page_get_gfn, kvm_mmu_page_set_access
from kvmsplit.rmap import Sptep
from kvmsplit.spte import (
    ACC_WRITE_MASK,
    PG_LEVEL_4K,
    is_shadow_present_pte,
    make_spte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm, KvmVcpu

# Guest accessed/dirty bits per format (x86: bits 5/6, EPT: bits 8/9).
_GUEST_ACCESSED = {"x86": 1 << 5, "ept": 1 << 8}
_GUEST_DIRTY = {"x86": 1 << 6, "ept": 1 << 9}


def fmt_for_role_guest_mode(guest_mode: bool) -> GptFormat:
    return EPT_GPT if guest_mode else X86_GPT


def walk_for(kvm: Kvm, vcpu: KvmVcpu, addr: int) -> GuestWalker | None:
    ctx = vcpu.mmu
    if ctx.pgd is None:
        return None
    return guest_walk(kvm, fmt_for_role_guest_mode(vcpu.guest_mode), ctx.pgd, addr)


def protect_clean_gpte(fmt: GptFormat, access: int, gpte: int) -> int:
    """A clean guest PTE is mapped read-only so the first write sets its D bit."""
    if not gpte & _GUEST_DIRTY[fmt.name]:
        access &= ~ACC_WRITE_MASK
    return access


def fname_page_fault(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    """FNAME(page_fault)."""
    fmt = fmt_for_role_guest_mode(vcpu.guest_mode)
    walker = walk_for(kvm, vcpu, fault.addr)
    need = required_access(fault.write, fault.exec)
    if walker is not None and not fault.write:
        walker.pte_access = protect_clean_gpte(fmt, walker.pte_access, walker.ptes[walker.level])
    if walker is None or need & ~walker.pte_access:
        # The guest's own tables deny the access: inject #PF / EPT violation.
        vcpu.stat.pf_guest += 1
        return RET_PF_GUEST
    fault.gfn = walker.gfn
    fault.max_level = walker.level
    fault.slot = kvm.gfn_to_memslot(fault.gfn)
    if page_fault_handle_page_track(kvm, fault):
        # shadow_page_table_clear_flood(): the walk's pages are not flooded.
        for sptep in _shadow_path(kvm, vcpu, fault.addr):
            sptep.sp.write_flooding_count = 0
        return RET_PF_EMULATE
    r = kvm_faultin_pfn(kvm, vcpu, fault)
    if r != RET_PF_CONTINUE:
        return r
    shadow_mmu.make_mmu_pages_available(kvm)
    r = fname_fetch(kvm, vcpu, fault, walker, fmt)
    kvm.mmu_unlock("FNAME(page_fault)")
    return r


def _shadow_path(kvm: Kvm, vcpu: KvmVcpu, addr: int) -> list[Sptep]:
    from kvmsplit.mmu import shadow_walk

    root = vcpu.mmu.root
    assert root is not None
    return shadow_walk(kvm, root, addr)


def fname_fetch(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault, gw: GuestWalker, fmt: GptFormat) -> int:
    """FNAME(fetch): shadow the guest's tables down to its leaf, then map."""
    root = vcpu.mmu.root
    assert root is not None
    direct_access = gw.pte_access
    sp = root
    level = root.role.level
    # Levels where the guest has page tables: indirect shadow pages.
    while True:
        sptep = Sptep(sp, SPTE_INDEX(fault.addr, level))
        sptep.sp.write_flooding_count = 0  # clear_sp_write_flooding_count()
        if level == gw.level:
            break
        table_gfn = gw.table_gfn[level - 1]
        access = gw.pt_access[level - 1]
        child = shadow_mmu.kvm_mmu_get_child_sp(kvm, vcpu, sptep, table_gfn, False, access)
        # Sync before linking: an upper-level table must be in sync.
        if child is not None and child.unsync_children and mmu_sync_children(kvm, vcpu, child, False):
            return RET_PF_RETRY
        if child is not None:
            shadow_mmu.link_shadow_page(kvm, sptep, child)
        if fault.write and table_gfn == fault.gfn:
            fault.write_fault_to_shadow_pgtable = True
        sp = kvm.spte_to_child_sp(sptep.spte)
        level -= 1
    kvm_mmu_hugepage_adjust(kvm, fault)
    # Below a guest huge page: direct shadow pages with the guest's access.
    while True:
        sptep = Sptep(sp, SPTE_INDEX(fault.addr, level))
        if fault.nx_huge_page_workaround_enabled:
            disallowed_hugepage_adjust(kvm, fault, sptep.spte, level)
        base_gfn = gfn_round_for_level(fault.gfn, level)
        if level == fault.goal_level:
            break
        shadow_mmu.validate_direct_spte(kvm, sptep, direct_access)
        child = shadow_mmu.kvm_mmu_get_child_sp(kvm, vcpu, sptep, base_gfn, True, direct_access)
        if child is not None:
            shadow_mmu.link_shadow_page(kvm, sptep, child)
            if fault.huge_page_disallowed:
                shadow_mmu.account_nx_huge_page(kvm, child, fault.req_level >= level)
        sp = kvm.spte_to_child_sp(sptep.spte)
        level -= 1
    ret = mmu_set_spte(kvm, fault.slot, sptep, gw.pte_access, base_gfn, fault.pfn, fault, vcpu)
    if ret != RET_PF_SPURIOUS:
        fname_pte_prefetch(kvm, vcpu, gw, sptep, fmt)
    return ret


def prefetch_invalid_gpte(kvm: Kvm, fmt: GptFormat, sptep: Sptep, gpte: int) -> bool:
    """Drop the SPTE and return true unless @gpte is present and accessed."""
    if not fmt.is_present_gpte(gpte) or not gpte & _GUEST_ACCESSED[fmt.name]:
        shadow_mmu.drop_spte(kvm, sptep)
        return True
    return False


def fname_prefetch_gpte(kvm: Kvm, vcpu: KvmVcpu, sp: KvmMmuPage, sptep: Sptep, gpte: int, fmt: GptFormat) -> bool:
    if prefetch_invalid_gpte(kvm, fmt, sptep, gpte):
        return False
    gfn = fmt.gpte_to_gfn_lvl(gpte, PG_LEVEL_4K)
    pte_access = sp.role.access & fmt.gpte_access(gpte)
    pte_access = protect_clean_gpte(fmt, pte_access, gpte)
    slot = gfn_to_memslot_dirty_bitmap(kvm, gfn, bool(pte_access & ACC_WRITE_MASK))
    if slot is None:
        return False
    pfn = gfn_to_pfn_atomic(kvm, slot, gfn)
    if pfn is None:
        return False
    mmu_set_spte(kvm, slot, sptep, pte_access, gfn, pfn, None)
    return True


def fname_pte_prefetch(kvm: Kvm, vcpu: KvmVcpu, gw: GuestWalker, sptep: Sptep, fmt: GptFormat) -> None:
    sp = sptep.sp
    if sp.role.level > PG_LEVEL_4K:
        return
    if sp.role.direct:
        _direct_pte_prefetch(kvm, sp, sptep)
        return
    gptes = kvm.guest_tables.get(sp.gfn)
    if gptes is None:
        return
    first = sptep.index & ~7
    for i in range(first, first + 8):
        if i == sptep.index or is_shadow_present_pte(sp.spt[i]):
            continue
        if not fname_prefetch_gpte(kvm, vcpu, sp, Sptep(sp, i), gptes[i], fmt):
            break


# --- resync ----------------------------------------------------------------------


def fname_sync_spte(kvm: Kvm, vcpu: KvmVcpu, sp: KvmMmuPage, i: int) -> int:
    """Refresh entry @i of unsync @sp from the guest PTE; >0 asks for a flush, <0 fails."""
    fmt = fmt_for_role_guest_mode(sp.role.guest_mode)
    sptep = Sptep(sp, i)
    kvm_bug_on(not sp.spt[i], "FNAME(sync_spte)", lambda: f"entry {i} of {sp!r} is empty")
    gptes = kvm.guest_tables.get(sp.gfn)
    if gptes is None or kvm.gfn_to_memslot(sp.gfn) is None:
        return -1
    gpte = gptes[i]
    if prefetch_invalid_gpte(kvm, fmt, sptep, gpte):
        return 1
    gfn = fmt.gpte_to_gfn_lvl(gpte, PG_LEVEL_4K)
    pte_access = sp.role.access & fmt.gpte_access(gpte)
    pte_access = protect_clean_gpte(fmt, pte_access, gpte)
    if not is_shadow_present_pte(sp.spt[i]):
        # An MMIO SPTE (sync_mmio_spte()): keep it if the gfn still matches.
        return 0
    if (not pte_access and not kvm.masks.shadow_present_mask) or gfn != kvm_mmu_page_get_gfn(sp, i):
        shadow_mmu.drop_spte(kvm, sptep)
        return 1
    if kvm_mmu_page_get_access(sp, i) == pte_access:
        return 0
    kvm_mmu_page_set_access(sp, i, pte_access)
    spte = sptep.spte
    host_writable = bool(spte & kvm.masks.shadow_host_writable_mask)
    slot = kvm.gfn_to_memslot(gfn)
    _, new_spte = make_spte(kvm, sp, slot, pte_access, gfn, spte_to_pfn(spte), spte, True, True, host_writable)
    return int(shadow_mmu.mmu_spte_update(kvm, sptep, new_spte))


def _kvm_sync_page(kvm: Kvm, vcpu: KvmVcpu, sp: KvmMmuPage) -> int:
    root = vcpu.mmu.root
    ignore = 0xF | (0x7 << 8) | (0x3 << 5) | (1 << 18)  # level, access, quadrant, passthrough
    if sp.role.direct or root is None or ((sp.role.word ^ _root_role_word(kvm, vcpu)) & ~ignore):
        kvm_bug_on(True, "kvm_sync_page_check", f"cannot sync {sp!r} with vcpu {vcpu.vcpu_id}'s MMU")
        return -1
    flush = 0
    for i in range(512):
        if not sp.spt[i]:
            continue
        ret = fname_sync_spte(kvm, vcpu, sp, i)
        if ret < -1:
            return -1
        flush |= ret
    return flush


def _root_role_word(kvm: Kvm, vcpu: KvmVcpu) -> int:
    from kvmsplit.mmu import mmu_root_role

    return mmu_root_role(kvm, vcpu).word


def kvm_sync_page(kvm: Kvm, vcpu: KvmVcpu, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> int:
    ret = _kvm_sync_page(kvm, vcpu, sp)
    if ret < 0:
        shadow_mmu.kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
    return ret


def mmu_sync_children(kvm: Kvm, vcpu: KvmVcpu, parent: KvmMmuPage, can_yield: bool) -> int:
    """Resync every unsync page below @parent, write-protecting their gfns first."""
    invalid_list: list[KvmMmuPage] = []
    flush = False
    while True:
        pages = shadow_mmu.mmu_unsync_walk(kvm, parent)
        if not pages:
            break
        protected = False
        for sp, _ in pages:
            slot = kvm.gfn_to_memslot(sp.gfn)
            if slot is not None:
                protected |= shadow_mmu.kvm_mmu_slot_gfn_write_protect(kvm, slot, sp.gfn, PG_LEVEL_4K)
        if protected:
            shadow_mmu.kvm_mmu_remote_flush_or_zap(kvm, invalid_list, True)
            flush = False
        for sp, path in pages:
            if shadow_mmu.is_obsolete_sp(kvm, sp) or not sp.unsync:
                shadow_mmu.mmu_pages_clear_parents(path)
                continue
            shadow_mmu.kvm_unlink_unsync_page(kvm, sp)
            # Model: count resyncs, so state machine runs show they reach one.
            kvm.model_split_env.events["unsync_resynced"] += 1
            flush |= kvm_sync_page(kvm, vcpu, sp, invalid_list) > 0
            shadow_mmu.mmu_pages_clear_parents(path)
    shadow_mmu.kvm_mmu_remote_flush_or_zap(kvm, invalid_list, flush)
    return 0


def kvm_mmu_sync_roots(kvm: Kvm, vcpu: KvmVcpu) -> None:
    root = vcpu.mmu.root
    if root is None or root.role.direct:
        return
    if not (root.unsync or root.unsync_children):  # is_unsync_root()
        return
    mmu_sync_children(kvm, vcpu, root, True)
    kvm.mmu_unlock("kvm_mmu_sync_roots")
