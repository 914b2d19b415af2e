"""The TDP MMU, mirroring arch/x86/kvm/mmu/tdp_mmu.c.

TDP MMU pages are never hashed, never in rmaps or active_mmu_pages, have
one parent SPTE (`ptep`) and are counted in `tdp_mmu_pages`.  Every change
of a present SPTE goes through handle_changed_spte(), which moves the page
stats and tears down page tables that are no longer linked.

The walk is pre-order and re-reads an SPTE before stepping down into it
(try_step_down()), so a split 1G page is followed into its new 2M table in
the same pass.  Changes made with mmu_lock held for read use
tdp_mmu_set_spte_atomic(), a compare-and-exchange against the value the
walker read; `Kvm.model_tdp_race`, when set, runs just before the compare
so a harness can play another thread (a hardware A/D update, a zap, another
splitter).

Model: no RCU and no yielding (tdp_mmu_iter_cond_resched() never yields
unless a harness asks); one address space.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from kvmsplit.errors import kvm_bug_on
from kvmsplit.memslot import KvmMemorySlot
from kvmsplit.mmu_page import KvmMmuPage
from kvmsplit.rmap import Sptep
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    REMOVED_SPTE,
    SPTE_ENT_PER_PAGE,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_removed_spte,
    is_shadow_present_pte,
    kvm_mmu_page_ad_need_write_protect,
    make_mmio_spte,
    make_nonleaf_spte,
    make_spte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm, KvmVcpu
    from kvmsplit.mmu import KvmPageFault

SHADOW_NONPRESENT_VALUE = 0
_PLACEHOLDER_ROLE = KvmMmuPageRole(level=1, direct=True)
EBUSY = -16
ENOMEM = -12


@attrs.define
class TdpIter:
    """struct tdp_iter: where the walk is and the SPTE value it read there."""

    sptep: Sptep
    level: int
    gfn: int
    old_spte: int
    yielded: bool = False


def for_each_tdp_pte_min_level(kvm: Kvm, root: KvmMmuPage, min_level: int, start: int, end: int) -> Iterator[TdpIter]:
    """Pre-order walk over SPTEs at levels >= @min_level covering gfns [start, end)."""

    def rec(sp: KvmMmuPage, level: int, base: int) -> Iterator[TdpIter]:
        span = KVM_PAGES_PER_HPAGE(level)
        first = max(0, (start - base) // span)
        last = min(SPTE_ENT_PER_PAGE - 1, (end - 1 - base) // span)
        for i in range(first, last + 1):
            gfn = base + i * span
            sptep = Sptep(sp, i)
            yield TdpIter(sptep, level, gfn, sp.spt[i])
            spte = sp.spt[i]  # try_step_down() re-reads the SPTE
            if level > min_level and is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                yield from rec(kvm.spte_to_child_sp(spte), level - 1, gfn)

    if end > start:
        yield from rec(root, root.role.level, 0)


def tdp_mmu_roots(kvm: Kvm, only_valid: bool) -> list[KvmMmuPage]:
    return [r for r in kvm.tdp_mmu_roots if not (only_valid and r.role.invalid)]


# --- roots ---------------------------------------------------------------------


def kvm_tdp_mmu_get_vcpu_root(kvm: Kvm, role: KvmMmuPageRole) -> KvmMmuPage:
    """kvm_tdp_mmu_alloc_root(): share a valid root with the same role, else make one."""
    for root in tdp_mmu_roots(kvm, only_valid=True):
        if root.role.word == role.word:
            root.root_count += 1
            return root
    root = KvmMmuPage(role=role, gfn=0, pfn=kvm.alloc_page_table_pfn(), tdp_mmu_page=True)
    # One reference for the vCPU, one held by the TDP MMU until invalidation.
    root.root_count = 2
    kvm.sp_by_pfn[root.pfn] = root
    kvm.tdp_mmu_roots.insert(0, root)
    return root


def kvm_tdp_mmu_put_root(kvm: Kvm, root: KvmMmuPage) -> None:
    root.root_count -= 1
    kvm_bug_on(root.root_count < 0, "kvm_tdp_mmu_put_root", lambda: f"{root!r} refcount < 0")
    if root.root_count:
        return
    kvm_bug_on(not root.role.invalid, "kvm_tdp_mmu_put_root", lambda: f"freeing valid {root!r}")
    tdp_mmu_zap_root(kvm, root)
    kvm.tdp_mmu_roots.remove(root)
    kvm.sp_by_pfn.pop(root.pfn, None)


def kvm_tdp_mmu_invalidate_all_roots(kvm: Kvm) -> None:
    for root in kvm.tdp_mmu_roots:
        if not root.role.invalid:
            root.tdp_mmu_scheduled_root_to_zap = True
            root.role = root.role.evolve(invalid=True)


def tdp_mmu_zap_root(kvm: Kvm, root: KvmMmuPage) -> None:
    for i in range(SPTE_ENT_PER_PAGE):
        old = root.spt[i]
        if is_shadow_present_pte(old):
            tdp_mmu_set_spte(
                kvm,
                Sptep(root, i),
                old,
                SHADOW_NONPRESENT_VALUE,
                i * KVM_PAGES_PER_HPAGE(root.role.level),
                root.role.level,
            )


def kvm_tdp_mmu_zap_invalidated_roots(kvm: Kvm) -> None:
    """Zap invalidated roots; no flush is needed, a vCPU flushes when it loads a new root."""
    for root in list(kvm.tdp_mmu_roots):
        if not root.tdp_mmu_scheduled_root_to_zap:
            continue
        root.tdp_mmu_scheduled_root_to_zap = False
        tdp_mmu_zap_root(kvm, root)
        kvm_tdp_mmu_put_root(kvm, root)
    kvm.mmu_unlock("kvm_tdp_mmu_zap_invalidated_roots")


def kvm_tdp_mmu_zap_all(kvm: Kvm) -> None:
    for root in list(kvm.tdp_mmu_roots):
        tdp_mmu_zap_root(kvm, root)


# --- SPTE changes ------------------------------------------------------------------


def tdp_account_mmu_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    kvm.tdp_mmu_pages += 1
    kvm.sp_by_pfn[sp.pfn] = sp


def tdp_mmu_unlink_sp(kvm: Kvm, sp: KvmMmuPage) -> None:
    from kvmsplit import shadow_mmu

    kvm.tdp_mmu_pages -= 1
    if sp.nx_huge_page_disallowed:
        sp.nx_huge_page_disallowed = False
        shadow_mmu.untrack_possible_nx_huge_page(kvm, sp)


def handle_removed_pt(kvm: Kvm, sp: KvmMmuPage, shared: bool) -> None:
    """Tear down a page table that is no longer linked; its leaves leave the stats."""
    level = sp.role.level
    tdp_mmu_unlink_sp(kvm, sp)
    for i in range(SPTE_ENT_PER_PAGE):
        old = sp.spt[i]
        gfn = sp.gfn + i * KVM_PAGES_PER_HPAGE(level)
        if not shared and not is_shadow_present_pte(old):
            continue
        sp.spt[i] = REMOVED_SPTE
        handle_changed_spte(kvm, gfn, old, REMOVED_SPTE, level, shared)
    kvm.sp_by_pfn.pop(sp.pfn, None)


def handle_changed_spte(kvm: Kvm, gfn: int, old_spte: int, new_spte: int, level: int, shared: bool) -> None:
    was_present = bool(is_shadow_present_pte(old_spte))
    is_present = bool(is_shadow_present_pte(new_spte))
    was_leaf = was_present and bool(is_last_spte(old_spte, level))
    is_leaf = is_present and bool(is_last_spte(new_spte, level))
    pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)
    kvm_bug_on(
        was_leaf and is_leaf and pfn_changed,
        "handle_changed_spte",
        lambda: f"leaf pfn changed in place at gfn {gfn:#x} level {level}: {old_spte:#x} -> {new_spte:#x}",
    )
    if old_spte == new_spte:
        return
    if not was_present and not is_present:
        return
    if is_leaf != was_leaf:
        kvm.kvm_update_page_stats(level, 1 if is_leaf else -1)
    if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
        handle_removed_pt(kvm, kvm.spte_to_child_sp(old_spte), shared)


def tdp_mmu_set_spte_atomic(kvm: Kvm, it: TdpIter, new_spte: int) -> int:
    """try_cmpxchg64() against it.old_spte; -EBUSY with old_spte refreshed on a lost race."""
    kvm_bug_on(
        it.yielded or is_removed_spte(it.old_spte), "tdp_mmu_set_spte_atomic", lambda: f"bad iter at gfn {it.gfn:#x}"
    )
    if kvm.model_tdp_race is not None:
        kvm.model_tdp_race(kvm, it)
    current = it.sptep.spte
    if current != it.old_spte:
        it.old_spte = current
        return EBUSY
    it.sptep.sp.spt[it.sptep.index] = new_spte
    handle_changed_spte(kvm, it.gfn, it.old_spte, new_spte, it.level, True)
    # try_cmpxchg64() refreshes old_spte only on failure: on success it still
    # holds what was replaced, which callers test (e.g. for a table to flush).
    return 0


def tdp_mmu_set_spte(kvm: Kvm, sptep: Sptep, old_spte: int, new_spte: int, gfn: int, level: int) -> int:
    """Exclusive (mmu_lock held for write) update; frozen SPTEs must not be involved."""
    kvm_bug_on(is_removed_spte(old_spte) or is_removed_spte(new_spte), "tdp_mmu_set_spte", "frozen SPTE")
    sptep.sp.spt[sptep.index] = new_spte
    handle_changed_spte(kvm, gfn, old_spte, new_spte, level, False)
    return old_spte


def tdp_mmu_iter_set_spte(kvm: Kvm, it: TdpIter, new_spte: int) -> None:
    # Like the kernel, old_spte keeps the value that was replaced.
    it.old_spte = tdp_mmu_set_spte(kvm, it.sptep, it.old_spte, new_spte, it.gfn, it.level)


def tdp_mmu_zap_spte_atomic(kvm: Kvm, it: TdpIter) -> int:
    """Freeze, flush, then clear, so nobody maps the range before the flush."""
    ret = tdp_mmu_set_spte_atomic(kvm, it, REMOVED_SPTE)
    if ret:
        return ret
    kvm.kvm_flush_remote_tlbs_range(it.gfn, KVM_PAGES_PER_HPAGE(it.level), "tdp_mmu_zap_spte_atomic")
    it.sptep.sp.spt[it.sptep.index] = SHADOW_NONPRESENT_VALUE
    it.old_spte = SHADOW_NONPRESENT_VALUE
    return 0


# --- allocation and linking ---------------------------------------------------------


def tdp_mmu_alloc_sp(kvm: Kvm) -> KvmMmuPage:
    """A zeroed page table; tdp_mmu_init_child_sp() gives it its place."""
    return KvmMmuPage(role=_PLACEHOLDER_ROLE, gfn=0, pfn=kvm.alloc_page_table_pfn(), tdp_mmu_page=True)


def tdp_mmu_init_child_sp(sp: KvmMmuPage, it: TdpIter) -> None:
    sp.role = it.sptep.sp.role.evolve(level=it.level - 1)
    sp.gfn = it.gfn
    sp.ptep = it.sptep


def tdp_mmu_link_sp(kvm: Kvm, it: TdpIter, sp: KvmMmuPage, shared: bool) -> int:
    spte = make_nonleaf_spte(kvm.masks, sp.pfn, not kvm.masks.shadow_accessed_mask)
    # Register the table first so handle_changed_spte() can follow the SPTE.
    kvm.sp_by_pfn[sp.pfn] = sp
    if shared:
        ret = tdp_mmu_set_spte_atomic(kvm, it, spte)
        if ret:
            kvm.sp_by_pfn.pop(sp.pfn, None)
            return ret
    else:
        tdp_mmu_iter_set_spte(kvm, it, spte)
    tdp_account_mmu_page(kvm, sp)
    return 0


def tdp_mmu_split_huge_page(kvm: Kvm, it: TdpIter, sp: KvmMmuPage, shared: bool) -> int:
    """Replace the huge leaf at @it with a brand-new table of 512 equal smaller pages."""
    from kvmsplit.split import split_policy

    huge_spte = it.old_spte
    level = it.level
    # The children come from the split policy's make_huge_page_split_spte(),
    # so a model variant changes both MMUs alike.
    build = split_policy(kvm).make_huge_page_split_spte
    for i in range(SPTE_ENT_PER_PAGE):
        sp.spt[i] = build(kvm, huge_spte, sp, i)
    # The table is unreachable until linked, so plain stores were enough.
    ret = tdp_mmu_link_sp(kvm, it, sp, shared)
    if ret:
        return ret
    kvm.kvm_update_page_stats(level - 1, SPTE_ENT_PER_PAGE)
    return 0


# --- faults -------------------------------------------------------------------------


def kvm_tdp_mmu_map(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    from kvmsplit import mmu, shadow_mmu

    root = vcpu.mmu.root
    assert root is not None
    mmu.kvm_mmu_hugepage_adjust(kvm, fault)
    for it in for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, fault.gfn, fault.gfn + 1):
        if fault.nx_huge_page_workaround_enabled:
            mmu.disallowed_hugepage_adjust(kvm, fault, it.old_spte, it.level)
        if is_removed_spte(it.old_spte):
            return mmu.RET_PF_RETRY
        if it.level == fault.goal_level:
            return tdp_mmu_map_handle_target_level(kvm, vcpu, fault, it)
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            continue
        # A huge SPTE above the goal is split in place; a hole gets a new table.
        sp = tdp_mmu_alloc_sp(kvm)
        tdp_mmu_init_child_sp(sp, it)
        sp.nx_huge_page_disallowed = fault.huge_page_disallowed
        if is_shadow_present_pte(it.old_spte):
            r = tdp_mmu_split_huge_page(kvm, it, sp, True)
        else:
            r = tdp_mmu_link_sp(kvm, it, sp, True)
        if r:
            return mmu.RET_PF_RETRY
        if fault.huge_page_disallowed and fault.req_level >= it.level and sp.nx_huge_page_disallowed:
            shadow_mmu.track_possible_nx_huge_page(kvm, sp)
    kvm_bug_on(True, "kvm_tdp_mmu_map", f"walk for gfn {fault.gfn:#x} ended above goal level {fault.goal_level}")
    return mmu.RET_PF_RETRY


def tdp_mmu_map_handle_target_level(kvm: Kvm, vcpu: KvmVcpu, fault: KvmPageFault, it: TdpIter) -> int:
    from kvmsplit import mmu

    sp = it.sptep.sp
    ret = mmu.RET_PF_FIXED
    wrprot = False
    if sp.role.level != fault.goal_level:
        return mmu.RET_PF_RETRY
    if fault.slot is None or fault.pfn is None:
        new_spte = make_mmio_spte(kvm.masks, kvm.memslots_generation, fault.gfn, ACC_ALL)
    else:
        wrprot, new_spte = make_spte(
            kvm, sp, fault.slot, ACC_ALL, fault.gfn, fault.pfn, it.old_spte, fault.prefetch, False, fault.map_writable
        )
    if new_spte == it.old_spte:
        ret = mmu.RET_PF_SPURIOUS
    elif tdp_mmu_set_spte_atomic(kvm, it, new_spte):
        return mmu.RET_PF_RETRY
    elif is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level):
        kvm.kvm_flush_remote_tlbs_range(it.gfn, KVM_PAGES_PER_HPAGE(it.level), "tdp_mmu_map_handle_target_level")
    if wrprot and fault.write:
        ret = mmu.RET_PF_EMULATE
    if is_mmio_spte(kvm.masks, new_spte):
        vcpu.stat.pf_mmio_spte_created += 1
        ret = mmu.RET_PF_EMULATE
    return ret


# --- zapping ---------------------------------------------------------------------------


def tdp_mmu_zap_leafs(kvm: Kvm, root: KvmMmuPage, start: int, end: int, flush: bool) -> bool:
    for it in for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, start, end):
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        tdp_mmu_iter_set_spte(kvm, it, SHADOW_NONPRESENT_VALUE)
        # Zapping in an invalid root needs no flush: no vCPU uses it.
        if not root.role.invalid:
            flush = True
            kvm.owe_flush("tdp_mmu_zap_leafs")
    return flush


def kvm_tdp_mmu_zap_leafs(kvm: Kvm, start: int, end: int, flush: bool) -> bool:
    for root in tdp_mmu_roots(kvm, only_valid=True):
        flush = tdp_mmu_zap_leafs(kvm, root, start, end, flush)
    return flush


def kvm_tdp_mmu_unmap_gfn_range(kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, flush: bool) -> bool:
    for root in tdp_mmu_roots(kvm, only_valid=False):
        flush = tdp_mmu_zap_leafs(kvm, root, start, end, flush)
    return flush


# --- dirty logging -----------------------------------------------------------------------


def wrprot_gfn_range(kvm: Kvm, root: KvmMmuPage, start: int, end: int, min_level: int) -> bool:
    spte_set = False
    for it in for_each_tdp_pte_min_level(kvm, root, min_level, start, end):
        while True:
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                break
            if not it.old_spte & PT_WRITABLE_MASK:
                break
            if tdp_mmu_set_spte_atomic(kvm, it, it.old_spte & ~PT_WRITABLE_MASK):
                continue
            kvm.owe_flush("wrprot_gfn_range", deferred=True)
            spte_set = True
            break
    return spte_set


def kvm_tdp_mmu_wrprot_slot(kvm: Kvm, slot: KvmMemorySlot, min_level: int) -> bool:
    spte_set = False
    for root in tdp_mmu_roots(kvm, only_valid=True):
        spte_set |= wrprot_gfn_range(kvm, root, slot.base_gfn, slot.end_gfn, min_level)
    return spte_set


def tdp_mmu_need_write_protect(kvm: Kvm, sp: KvmMmuPage) -> bool:
    return kvm_mmu_page_ad_need_write_protect(kvm, sp) or not kvm.masks.shadow_accessed_mask


def clear_dirty_gfn_range(kvm: Kvm, root: KvmMmuPage, start: int, end: int) -> bool:
    dbit = PT_WRITABLE_MASK if tdp_mmu_need_write_protect(kvm, root) else kvm.masks.shadow_dirty_mask
    spte_set = False
    for it in for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, start, end):
        while True:
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                break
            if not it.old_spte & dbit:
                break
            if tdp_mmu_set_spte_atomic(kvm, it, it.old_spte & ~dbit):
                continue
            kvm.owe_flush("clear_dirty_gfn_range", deferred=True)
            spte_set = True
            break
    return spte_set


def kvm_tdp_mmu_clear_dirty_slot(kvm: Kvm, slot: KvmMemorySlot) -> bool:
    spte_set = False
    for root in tdp_mmu_roots(kvm, only_valid=True):
        spte_set |= clear_dirty_gfn_range(kvm, root, slot.base_gfn, slot.end_gfn)
    return spte_set


def kvm_tdp_mmu_clear_dirty_pt_masked(kvm: Kvm, slot: KvmMemorySlot, gfn: int, mask: int, wrprot: bool) -> None:
    """Clear D (or W) on the 4K leaves selected by @mask; huge leaves are skipped."""
    for root in tdp_mmu_roots(kvm, only_valid=True):
        dbit = PT_WRITABLE_MASK if (wrprot or tdp_mmu_need_write_protect(kvm, root)) else kvm.masks.shadow_dirty_mask
        m = mask
        first = (m & -m).bit_length() - 1
        for it in for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, gfn + first, gfn + 64):
            if not m:
                break
            if it.level > PG_LEVEL_4K or not m & (1 << (it.gfn - gfn)):
                continue
            m &= ~(1 << (it.gfn - gfn))
            if not is_shadow_present_pte(it.old_spte) or not it.old_spte & dbit:
                continue
            # tdp_mmu_clear_spte_bits(): no handle_changed_spte() for a bit clear.
            it.sptep.sp.spt[it.sptep.index] = it.old_spte & ~dbit
            kvm.owe_flush("clear_dirty_pt_masked", deferred=True)


def write_protect_gfn(kvm: Kvm, root: KvmMmuPage, gfn: int, min_level: int, deferred: bool = False) -> bool:
    spte_set = False
    m = kvm.masks
    for it in for_each_tdp_pte_min_level(kvm, root, min_level, gfn, gfn + 1):
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        new_spte = it.old_spte & ~(PT_WRITABLE_MASK | m.shadow_mmu_writable_mask)
        if new_spte == it.old_spte:
            break
        tdp_mmu_iter_set_spte(kvm, it, new_spte)
        kvm.owe_flush("write_protect_gfn", deferred)
        spte_set = True
    return spte_set


def kvm_tdp_mmu_write_protect_gfn(
    kvm: Kvm, slot: KvmMemorySlot, gfn: int, min_level: int, deferred: bool = False
) -> bool:
    spte_set = False
    for root in tdp_mmu_roots(kvm, only_valid=True):
        spte_set |= write_protect_gfn(kvm, root, gfn, min_level, deferred)
    return spte_set


def kvm_tdp_mmu_zap_collapsible_sptes(kvm: Kvm, slot: KvmMemorySlot) -> None:
    from kvmsplit import mmu

    start, end = slot.base_gfn, slot.end_gfn
    for root in tdp_mmu_roots(kvm, only_valid=True):
        for it in for_each_tdp_pte_min_level(kvm, root, 2, start, end):
            while True:
                if it.level > KVM_MAX_HUGEPAGE_LEVEL or not is_shadow_present_pte(it.old_spte):
                    break
                # A leaf that could be huge would have had its parent zapped instead.
                if is_last_spte(it.old_spte, it.level):
                    break
                if it.gfn < start or it.gfn >= end:
                    break
                if mmu.kvm_mmu_max_mapping_level(kvm, slot, it.gfn, mmu.PG_LEVEL_NUM) < it.level:
                    break
                if tdp_mmu_zap_spte_atomic(kvm, it):
                    continue
                break


def kvm_tdp_mmu_age_gfn_range(kvm: Kvm, start: int, end: int) -> bool:
    """age_gfn_range() over every root: clear A (or access-track) on leaves, no flush."""
    from kvmsplit.spte import is_accessed_spte, mark_spte_for_access_track, spte_ad_enabled

    m = kvm.masks
    young = False
    for root in tdp_mmu_roots(kvm, only_valid=False):
        for it in for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, start, end):
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            if not is_accessed_spte(m, it.old_spte):
                continue
            young = True
            if spte_ad_enabled(it.old_spte):
                new = it.old_spte & ~m.shadow_accessed_mask
            else:
                new = mark_spte_for_access_track(m, it.old_spte)
            it.sptep.sp.spt[it.sptep.index] = new
    return young
