"""The shadow MMU's page machinery, mirroring arch/x86/kvm/mmu/mmu.c.

Shadow page lookup and allocation, rmaps and parent pointers, linking and
dropping SPTEs, unsync and resync, write tracking of shadowed gfns, zapping
(prepare/commit), recycling, roots and the MMU-page accounting.  The fault
handlers that use this live in mmu.py (direct_map()) and paging_tmpl.py
(FNAME(fetch)).

Model: an "invalid_list" is a Python list; kvm_mmu_commit_zap_page() flushes
and frees it.  A shadow page is freed by dropping it from the hash, the
active list and `Kvm.sp_by_pfn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmsplit.errors import HarnessError, kvm_bug_on
from kvmsplit.memslot import (
    KvmMemorySlot,
    gfn_to_rmap,
    kvm_mmu_gfn_allow_lpage,
    kvm_mmu_gfn_disallow_lpage,
    rmap_head_release,
)
from kvmsplit.mmu_page import (
    KVM_MMU_HASH_SHIFT,
    KvmMmuPage,
    hash_64,
    kvm_mmu_child_role,
    kvm_mmu_page_get_gfn,
    kvm_mmu_page_set_translation,
    new_table,
    sp_has_gptes,
)
from kvmsplit.rmap import (
    RMAP_RECYCLE_THRESHOLD,
    KvmMmuMemoryCache,
    KvmRmapHead,
    Sptep,
    pte_list_add,
    pte_list_remove,
    rmap_first,
    rmap_iter,
)
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    check_spte_writable_invariants,
    is_accessed_spte,
    is_dirty_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_nonleaf_spte,
    spte_ad_need_write_protect,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm, KvmMmuContext, KvmVcpu

InvalidList = list[KvmMmuPage]


# --- SPTE primitives ---------------------------------------------------------


def mmu_spte_set(kvm: Kvm, sptep: Sptep, new_spte: int) -> None:
    """Install @new_spte over a non-present SPTE."""
    if is_shadow_present_pte(sptep.spte):
        kvm_bug_on(True, "mmu_spte_set", f"{sptep!r} is already present ({sptep.spte:#x}), new {new_spte:#x}")
    sptep.sp.spt[sptep.index] = new_spte


def mmu_spte_update_no_track(kvm: Kvm, sptep: Sptep, new_spte: int) -> int:
    old_spte = sptep.spte
    kvm_bug_on(
        not is_shadow_present_pte(new_spte), "mmu_spte_update_no_track", lambda: f"new {new_spte:#x} not present"
    )
    check_spte_writable_invariants(kvm.masks, new_spte)
    if not is_shadow_present_pte(old_spte):
        mmu_spte_set(kvm, sptep, new_spte)
        return old_spte
    sptep.sp.spt[sptep.index] = new_spte
    if spte_to_pfn(old_spte) != spte_to_pfn(new_spte):
        kvm_bug_on(
            True,
            "mmu_spte_update_no_track",
            f"pfn of present {sptep!r} changed in place: {old_spte:#x} -> {new_spte:#x}",
        )
    return old_spte


def mmu_spte_update(kvm: Kvm, sptep: Sptep, new_spte: int, deferred: bool = False) -> bool:
    """Update a present SPTE; return whether a TLB flush is needed (B semantics).

    Model: @deferred marks dirty-logging W/D clears, whose flush KVM may
    issue after dropping mmu_lock (before returning to userspace).
    """
    m = kvm.masks
    old_spte = mmu_spte_update_no_track(kvm, sptep, new_spte)
    if not is_shadow_present_pte(old_spte):
        return False
    flush = bool(is_mmu_writable_spte(m, old_spte)) and not is_writable_pte(new_spte)
    if is_accessed_spte(m, old_spte) and not is_accessed_spte(m, new_spte):
        flush = True
    if is_dirty_spte(m, old_spte) and not is_dirty_spte(m, new_spte):
        flush = True
    if flush:
        kvm.owe_flush("mmu_spte_update", deferred)
    return flush


def mmu_spte_clear_track_bits(kvm: Kvm, sptep: Sptep, owe_flush: bool = True) -> int:
    """Clear a leaf SPTE, moving its page stat (mmu.c).

    Model: @owe_flush records the flush the zap needs; only eager splitting's
    drop of a huge SPTE whose translation stays the same passes False.
    """
    old_spte = sptep.spte
    sptep.sp.spt[sptep.index] = 0
    if not is_shadow_present_pte(old_spte):
        return old_spte
    kvm.kvm_update_page_stats(sptep.sp.role.level, -1)
    if owe_flush:
        kvm.owe_flush("mmu_spte_clear_track_bits")
    return old_spte


def mmu_spte_clear_no_track(kvm: Kvm, sptep: Sptep) -> None:
    sptep.sp.spt[sptep.index] = 0


def drop_spte(kvm: Kvm, sptep: Sptep, owe_flush: bool = True) -> None:
    old_spte = mmu_spte_clear_track_bits(kvm, sptep, owe_flush)
    if is_shadow_present_pte(old_spte):
        rmap_remove(kvm, sptep)


# --- rmaps ------------------------------------------------------------------


def kvm_memslot_for_sp_gfn(kvm: Kvm, sp: KvmMmuPage, gfn: int) -> KvmMemorySlot:
    """__gfn_to_memslot(kvm_memslots_for_spte_role(kvm, sp->role), gfn)."""
    slot = kvm.gfn_to_memslot(gfn)
    kvm_bug_on(slot is None, "rmap_remove", lambda: f"gfn {gfn:#x} of {sp!r} is in no memslot")
    assert slot is not None
    return slot


def rmap_add(
    kvm: Kvm, slot: KvmMemorySlot, sptep: Sptep, gfn: int, access: int, cache: KvmMmuMemoryCache | None = None
) -> None:
    """__rmap_add(): record the translation, count the page, link the rmap."""
    sp = sptep.sp
    kvm_mmu_page_set_translation(sp, sptep.index, gfn, access)
    kvm.kvm_update_page_stats(sp.role.level, 1)
    rmap_head = gfn_to_rmap(gfn, sp.role.level, slot, create=True)
    assert rmap_head is not None
    rmap_count = pte_list_add(sptep, rmap_head, cache)
    if rmap_count > kvm.stat.max_mmu_rmap_size:
        kvm.stat.max_mmu_rmap_size = rmap_count
    if rmap_count > RMAP_RECYCLE_THRESHOLD:
        kvm_zap_all_rmap_sptes(kvm, rmap_head)
        rmap_head_release(gfn, sp.role.level, slot)
        kvm.kvm_flush_remote_tlbs_range(gfn, KVM_PAGES_PER_HPAGE(sp.role.level), "__rmap_add recycle")


def rmap_remove(kvm: Kvm, sptep: Sptep) -> None:
    sp = sptep.sp
    gfn = kvm_mmu_page_get_gfn(sp, sptep.index)
    slot = kvm_memslot_for_sp_gfn(kvm, sp, gfn)
    rmap_head = gfn_to_rmap(gfn, sp.role.level, slot)
    kvm_bug_on(rmap_head is None, "pte_list_remove", lambda: f"{sptep!r} (gfn {gfn:#x}) has no rmap head")
    assert rmap_head is not None
    pte_list_remove(sptep, rmap_head)
    rmap_head_release(gfn, sp.role.level, slot)


def kvm_zap_all_rmap_sptes(kvm: Kvm, rmap_head: KvmRmapHead) -> bool:
    """Zap every SPTE in @rmap_head; return whether any was there."""
    if rmap_head.val is None:
        return False
    for sptep in list(rmap_iter(rmap_head)):
        mmu_spte_clear_track_bits(kvm, sptep)
    rmap_head.val = None
    return True


def rmap_sptes(kvm: Kvm, slot: KvmMemorySlot, level: int, start: int, end: int) -> list[tuple[int, KvmRmapHead]]:
    """Model: the non-empty rmap heads of @slot at @level for gfns [start, end], in gfn order.

    Mirrors the iteration of for_each_slot_rmap_range() without touching the
    empty heads.
    """
    from kvmsplit.memslot import gfn_to_index

    d = slot.rmap[level - 1]
    if not d:
        return []
    lo = gfn_to_index(start, slot.base_gfn, level)
    hi = gfn_to_index(end, slot.base_gfn, level)
    if hi - lo + 1 <= len(d):
        keys = [i for i in range(lo, hi + 1) if i in d]
    else:
        keys = sorted(i for i in d if lo <= i <= hi)
    return [(i, d[i]) for i in keys]


def walk_slot_rmaps(
    kvm: Kvm, slot: KvmMemorySlot, handler, start_level: int, end_level: int, start: int, end: int
) -> bool:  # type: ignore[no-untyped-def]
    """__walk_slot_rmaps(): call @handler(kvm, rmap_head, slot, gfn, level) on each non-empty head.

    Model: never yields (no contention), so flush_on_yield has no effect.
    """
    flush = False
    for level in range(start_level, end_level + 1):
        for index, head in rmap_sptes(kvm, slot, level, start, end):
            gfn = ((slot.base_gfn >> ((level - 1) * 9)) + index) << ((level - 1) * 9)
            flush |= bool(handler(kvm, head, slot, max(gfn, slot.base_gfn), level))
            if head.val is None:
                slot.rmap[level - 1].pop(index, None)
    return flush


# --- write protection and dirty bits ------------------------------------------


def spte_write_protect(kvm: Kvm, sptep: Sptep, pt_protect: bool, deferred: bool = False) -> bool:
    spte = sptep.spte
    m = kvm.masks
    if not is_writable_pte(spte) and not (pt_protect and is_mmu_writable_spte(m, spte)):
        return False
    if pt_protect:
        spte &= ~m.shadow_mmu_writable_mask
    spte &= ~PT_WRITABLE_MASK
    # Clearing only W (dirty logging) may defer the flush past mmu_lock.
    return mmu_spte_update(kvm, sptep, spte, deferred=deferred or not pt_protect)


def rmap_write_protect(kvm: Kvm, rmap_head: KvmRmapHead | None, pt_protect: bool, deferred: bool = False) -> bool:
    if rmap_head is None:
        return False
    flush = False
    for sptep in list(rmap_iter(rmap_head)):
        flush |= spte_write_protect(kvm, sptep, pt_protect, deferred)
    return flush


def spte_clear_dirty(kvm: Kvm, sptep: Sptep) -> bool:
    spte = sptep.spte & ~kvm.masks.shadow_dirty_mask
    return mmu_spte_update(kvm, sptep, spte, deferred=True)


def spte_wrprot_for_clear_dirty(kvm: Kvm, sptep: Sptep) -> bool:
    was_writable = bool(sptep.spte & PT_WRITABLE_MASK)
    sptep.sp.spt[sptep.index] = sptep.spte & ~PT_WRITABLE_MASK
    if was_writable:
        kvm.owe_flush("spte_wrprot_for_clear_dirty", deferred=True)
    return was_writable


def _rmap_clear_dirty(kvm: Kvm, rmap_head: KvmRmapHead, slot: KvmMemorySlot, gfn: int = 0, level: int = 0) -> bool:
    flush = False
    for sptep in list(rmap_iter(rmap_head)):
        if spte_ad_need_write_protect(sptep.spte):
            flush |= spte_wrprot_for_clear_dirty(kvm, sptep)
        else:
            flush |= spte_clear_dirty(kvm, sptep)
    return flush


def kvm_mmu_slot_gfn_write_protect(
    kvm: Kvm, slot: KvmMemorySlot, gfn: int, min_level: int, deferred: bool = False
) -> bool:
    """Write-protect (clearing MMU-writable) every mapping of @gfn at >= @min_level.

    Model: @deferred marks the dirty-logging caller, which flushes after
    dropping mmu_lock.
    """
    from kvmsplit import tdp_mmu

    write_protected = False
    if kvm.kvm_memslots_have_rmaps():
        for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
            write_protected |= rmap_write_protect(kvm, gfn_to_rmap(gfn, level, slot), True, deferred)
    if kvm.tdp_mmu_enabled:
        write_protected |= tdp_mmu.kvm_tdp_mmu_write_protect_gfn(kvm, slot, gfn, min_level, deferred)
    return write_protected


# --- write tracking (page_track.c) -----------------------------------------------


def kvm_gfn_is_write_tracked(kvm: Kvm, slot: KvmMemorySlot | None, gfn: int) -> bool:
    """page_track.c; Model: tracking is enabled once a shadow root exists."""
    if slot is None:
        return False
    if kvm.config.tdp_enabled and not kvm.shadow_root_allocated:
        return False
    from kvmsplit.memslot import gfn_to_index

    return slot.gfn_write_track.get(gfn_to_index(gfn, slot.base_gfn, PG_LEVEL_4K), 0) != 0


def _kvm_write_track_add_gfn(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> None:
    from kvmsplit.memslot import gfn_to_index

    index = gfn_to_index(gfn, slot.base_gfn, PG_LEVEL_4K)
    count = slot.gfn_write_track.get(index, 0) + 1
    kvm_bug_on(count > 0xFFFF, "update_gfn_write_track", lambda: f"gfn {gfn:#x} write-track count overflow")
    slot.gfn_write_track[index] = count
    # A tracked gfn must not be mapped by a huge page.
    kvm_mmu_gfn_disallow_lpage(slot, gfn)
    if kvm_mmu_slot_gfn_write_protect(kvm, slot, gfn, PG_LEVEL_4K):
        kvm.kvm_flush_remote_tlbs("_kvm_write_track_add_gfn")


def _kvm_write_track_remove_gfn(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> None:
    from kvmsplit.memslot import gfn_to_index

    index = gfn_to_index(gfn, slot.base_gfn, PG_LEVEL_4K)
    count = slot.gfn_write_track.get(index, 0) - 1
    kvm_bug_on(count < 0, "update_gfn_write_track", lambda: f"gfn {gfn:#x} write-track count underflow")
    if count:
        slot.gfn_write_track[index] = count
    else:
        slot.gfn_write_track.pop(index, None)
    kvm_mmu_gfn_allow_lpage(slot, gfn)


def account_shadowed(kvm: Kvm, sp: KvmMmuPage) -> None:
    kvm.indirect_shadow_pages += 1
    gfn = sp.gfn
    slot = kvm_memslot_for_sp_gfn(kvm, sp, gfn)
    # Upper-level guest tables stay read-only: they are write-tracked.
    if sp.role.level > PG_LEVEL_4K:
        _kvm_write_track_add_gfn(kvm, slot, gfn)
        return
    kvm_mmu_gfn_disallow_lpage(slot, gfn)
    if kvm_mmu_slot_gfn_write_protect(kvm, slot, gfn, PG_LEVEL_4K):
        kvm.kvm_flush_remote_tlbs_range(gfn, 1, "account_shadowed")


def unaccount_shadowed(kvm: Kvm, sp: KvmMmuPage) -> None:
    kvm.indirect_shadow_pages -= 1
    gfn = sp.gfn
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None:
        return
    if sp.role.level > PG_LEVEL_4K:
        _kvm_write_track_remove_gfn(kvm, slot, gfn)
        return
    kvm_mmu_gfn_allow_lpage(slot, gfn)


# --- page hash, lookup, allocation -----------------------------------------------


def is_obsolete_sp(kvm: Kvm, sp: KvmMmuPage) -> bool:
    if sp.role.invalid:
        return True
    return not sp.tdp_mmu_page and sp.mmu_valid_gen != kvm.mmu_valid_gen


def for_each_valid_sp(kvm: Kvm, gfn: int) -> list[KvmMmuPage]:
    """The bucket of @gfn, skipping obsolete pages (gfn not yet checked)."""
    bucket = kvm.mmu_page_hash.get(hash_64(gfn, KVM_MMU_HASH_SHIFT), [])
    return [sp for sp in bucket if not is_obsolete_sp(kvm, sp)]


def for_each_gfn_valid_sp_with_gptes(kvm: Kvm, gfn: int) -> list[KvmMmuPage]:
    return [sp for sp in for_each_valid_sp(kvm, gfn) if sp.gfn == gfn and sp_has_gptes(sp)]


def kvm_mmu_alloc_shadow_page(
    kvm: Kvm, gfn: int, role: KvmMmuPageRole, caches: tuple[KvmMmuMemoryCache, ...] = ()
) -> KvmMmuPage:
    for cache in caches:
        cache.alloc("kvm_mmu_alloc_shadow_page")
    sp = KvmMmuPage(role=role, gfn=gfn, pfn=kvm.alloc_page_table_pfn())
    if not role.direct:
        sp.shadowed_translation = new_table()
    sp.mmu_valid_gen = kvm.mmu_valid_gen
    sp.model_seq = kvm.next_sp_seq
    kvm.next_sp_seq += 1
    kvm.active_mmu_pages[sp] = None
    kvm.n_used_mmu_pages += 1
    kvm.sp_by_pfn[sp.pfn] = sp
    kvm.mmu_page_hash.setdefault(hash_64(gfn, KVM_MMU_HASH_SHIFT), []).insert(0, sp)
    if sp_has_gptes(sp):
        account_shadowed(kvm, sp)
    return sp


def kvm_mmu_find_shadow_page(kvm: Kvm, vcpu: KvmVcpu | None, gfn: int, role: KvmMmuPageRole) -> KvmMmuPage | None:
    invalid_list: InvalidList = []
    collisions = 0
    found: KvmMmuPage | None = None
    for sp in for_each_valid_sp(kvm, gfn):
        if is_obsolete_sp(kvm, sp):
            continue  # zapped earlier in this walk
        if sp.gfn != gfn:
            collisions += 1
            continue
        if sp.role.word != role.word:
            # The guest is installing an upper-level table at this gfn,
            # which will be write-protected: an unsync page there cannot stay.
            if role.level > PG_LEVEL_4K and sp.unsync:
                kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            continue
        if sp.role.direct:
            found = sp
            break
        if sp.unsync:
            if vcpu is None:
                kvm_bug_on(True, "kvm_mmu_find_shadow_page", f"unsync {sp!r} found without a vCPU")
                break
            from kvmsplit import paging_tmpl

            ret = paging_tmpl.kvm_sync_page(kvm, vcpu, sp, invalid_list)
            if ret < 0:
                break
            if ret > 0:
                kvm.kvm_flush_remote_tlbs("kvm_mmu_find_shadow_page sync")
        sp.write_flooding_count = 0
        found = sp
        break
    if found is None:
        kvm.stat.mmu_cache_miss += 1
    kvm_mmu_commit_zap_page(kvm, invalid_list)
    if collisions > kvm.stat.max_mmu_page_hash_collisions:
        kvm.stat.max_mmu_page_hash_collisions = collisions
    return found


def kvm_mmu_get_shadow_page(
    kvm: Kvm, vcpu: KvmVcpu | None, gfn: int, role: KvmMmuPageRole, caches: tuple[KvmMmuMemoryCache, ...] = ()
) -> KvmMmuPage:
    """__kvm_mmu_get_shadow_page(): find or create; @vcpu may be None only for direct roles."""
    kvm_bug_on(vcpu is None and not role.direct, "__kvm_mmu_get_shadow_page", "indirect role without a vCPU")
    sp = kvm_mmu_find_shadow_page(kvm, vcpu, gfn, role)
    if sp is None:
        sp = kvm_mmu_alloc_shadow_page(kvm, gfn, role, caches)
    return sp


def kvm_mmu_get_child_sp(
    kvm: Kvm, vcpu: KvmVcpu | None, sptep: Sptep, gfn: int, direct: bool, access: int
) -> KvmMmuPage | None:
    """None stands for ERR_PTR(-EEXIST): *sptep already points at a table."""
    spte = sptep.spte
    if is_shadow_present_pte(spte) and not is_large_pte(spte):
        return None
    role = kvm_mmu_child_role(sptep.sp, sptep.index, direct, access)
    return kvm_mmu_get_shadow_page(kvm, vcpu, gfn, role)


# --- parents and unsync bookkeeping -------------------------------------------


def mmu_page_add_parent_pte(sp: KvmMmuPage, parent_pte: Sptep, cache: KvmMmuMemoryCache | None = None) -> None:
    pte_list_add(parent_pte, sp.parent_ptes, cache)


def drop_parent_pte(kvm: Kvm, sp: KvmMmuPage, parent_pte: Sptep) -> None:
    pte_list_remove(parent_pte, sp.parent_ptes)
    mmu_spte_clear_no_track(kvm, parent_pte)
    kvm.owe_flush("drop_parent_pte")


def kvm_mmu_unlink_parents(kvm: Kvm, sp: KvmMmuPage) -> None:
    while True:
        sptep = rmap_first(sp.parent_ptes)
        if sptep is None:
            return
        drop_parent_pte(kvm, sp, sptep)


def mark_unsync(sptep: Sptep) -> None:
    sp = sptep.sp
    bit = 1 << sptep.index
    if sp.unsync_child_bitmap & bit:
        return
    sp.unsync_child_bitmap |= bit
    sp.unsync_children += 1
    if sp.unsync_children > 1:
        return
    kvm_mmu_mark_parents_unsync(sp)


def kvm_mmu_mark_parents_unsync(sp: KvmMmuPage) -> None:
    for sptep in list(rmap_iter(sp.parent_ptes)):
        mark_unsync(sptep)


def clear_unsync_child_bit(sp: KvmMmuPage, index: int) -> None:
    sp.unsync_children -= 1
    kvm_bug_on(sp.unsync_children < 0, "clear_unsync_child_bit", lambda: f"{sp!r} unsync_children < 0")
    sp.unsync_child_bitmap &= ~(1 << index)


def kvm_unsync_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    kvm.stat.mmu_unsync += 1
    sp.unsync = True
    kvm_mmu_mark_parents_unsync(sp)


def kvm_unlink_unsync_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    kvm_bug_on(not sp.unsync, "kvm_unlink_unsync_page", lambda: f"{sp!r} is not unsync")
    sp.unsync = False
    kvm.stat.mmu_unsync -= 1


def mmu_try_to_unsync_pages(kvm: Kvm, slot: KvmMemorySlot | None, gfn: int, synchronizing: bool, prefetch: bool) -> int:
    """0 if a new writable SPTE may map @gfn, else -EPERM/-EEXIST (write-protect it)."""
    if kvm_gfn_is_write_tracked(kvm, slot, gfn):
        return -1  # -EPERM
    for sp in for_each_gfn_valid_sp_with_gptes(kvm, gfn):
        if synchronizing:
            return -1  # -EPERM
        if sp.unsync:
            continue
        if prefetch:
            return -17  # -EEXIST
        # Upper-level pages are write-tracked, so only 4K pages get here.
        kvm_bug_on(sp.role.level != PG_LEVEL_4K, "mmu_try_to_unsync_pages", lambda: f"unsync of {sp!r} above 4K")
        kvm_unsync_page(kvm, sp)
    return 0


# --- linking ------------------------------------------------------------------


def drop_large_spte(kvm: Kvm, sptep: Sptep, flush: bool) -> None:
    sp = sptep.sp
    kvm_bug_on(sp.role.level == PG_LEVEL_4K, "drop_large_spte", lambda: f"{sptep!r} is in a 4K page")
    # Without @flush the caller (eager split) vouches that the translation is
    # unchanged: the TLB checks judge that claim, so no flush debt is owed.
    drop_spte(kvm, sptep, owe_flush=flush)
    if flush:
        gfn = kvm_mmu_page_get_gfn(sp, sptep.index)
        kvm.kvm_flush_remote_tlbs_range(gfn, KVM_PAGES_PER_HPAGE(sp.role.level), "drop_large_spte")
    else:
        kvm.model_unflushed_huge_drops += 1


def _link_shadow_page(
    kvm: Kvm, sptep: Sptep, sp: KvmMmuPage, flush: bool, cache: KvmMmuMemoryCache | None = None
) -> None:
    """Point @sptep at @sp, dropping a huge leaf there first (flushing only if @flush)."""
    if is_shadow_present_pte(sptep.spte):
        drop_large_spte(kvm, sptep, flush)
    spte = make_nonleaf_spte(kvm.masks, sp.pfn, sp.role.ad_disabled)
    mmu_spte_set(kvm, sptep, spte)
    mmu_page_add_parent_pte(sp, sptep, cache)
    kvm_bug_on(sp.unsync_children != 0, "_link_shadow_page", lambda: f"linking {sp!r} with unsync children")
    if sp.unsync_children or sp.unsync:
        mark_unsync(sptep)


def link_shadow_page(kvm: Kvm, sptep: Sptep, sp: KvmMmuPage) -> None:
    _link_shadow_page(kvm, sptep, sp, True)


def validate_direct_spte(kvm: Kvm, sptep: Sptep, direct_access: int) -> None:
    spte = sptep.spte
    if is_shadow_present_pte(spte) and not is_large_pte(spte):
        child = kvm.spte_to_child_sp(spte)
        if child.role.access == direct_access:
            return
        drop_parent_pte(kvm, child, sptep)
        kvm.kvm_flush_remote_tlbs_range(
            kvm_mmu_page_get_gfn(child, 0), KVM_PAGES_PER_HPAGE(sptep.sp.role.level), "validate_direct_spte"
        )


# --- NX huge pages ----------------------------------------------------------------


def track_possible_nx_huge_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    if sp.possible_nx_huge_page:
        return
    kvm.stat.nx_lpage_splits += 1
    sp.possible_nx_huge_page = True
    kvm.possible_nx_huge_pages[sp] = None


def untrack_possible_nx_huge_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    if not sp.possible_nx_huge_page:
        return
    kvm.stat.nx_lpage_splits -= 1
    sp.possible_nx_huge_page = False
    kvm.possible_nx_huge_pages.pop(sp, None)


def account_nx_huge_page(kvm: Kvm, sp: KvmMmuPage, nx_huge_page_possible: bool) -> None:
    sp.nx_huge_page_disallowed = True
    if nx_huge_page_possible:
        track_possible_nx_huge_page(kvm, sp)


def unaccount_nx_huge_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    sp.nx_huge_page_disallowed = False
    untrack_possible_nx_huge_page(kvm, sp)


# --- zapping --------------------------------------------------------------------


def mmu_page_zap_pte(kvm: Kvm, sp: KvmMmuPage, sptep: Sptep, invalid_list: InvalidList | None) -> int:
    pte = sptep.spte
    if is_shadow_present_pte(pte):
        if is_last_spte(pte, sp.role.level):
            drop_spte(kvm, sptep)
        else:
            child = kvm.spte_to_child_sp(pte)
            drop_parent_pte(kvm, child, sptep)
            # Parentless nested TDP pages are unlikely to be used again soon.
            if (
                kvm.config.tdp_enabled
                and invalid_list is not None
                and child.role.guest_mode
                and child.parent_ptes.val is None
            ):
                return int(kvm_mmu_prepare_zap_page(kvm, child, invalid_list))
    elif is_mmio_spte(kvm.masks, pte):
        mmu_spte_clear_no_track(kvm, sptep)
    return 0


def kvm_mmu_page_unlink_children(kvm: Kvm, sp: KvmMmuPage, invalid_list: InvalidList) -> int:
    zapped = 0
    for i in range(512):
        if sp.spt[i]:
            zapped += mmu_page_zap_pte(kvm, sp, Sptep(sp, i), invalid_list)
    return zapped


def mmu_unsync_walk(kvm: Kvm, sp: KvmMmuPage) -> list[tuple[KvmMmuPage, list[tuple[KvmMmuPage, int]]]]:
    """Unsync leaf pages under @sp, each with its parents (nearest first).

    Model: __mmu_unsync_walk() without the 16-page batches of kvm_mmu_pages;
    the bits of children that are gone or synced are cleared lazily as in
    the kernel.
    """
    out: list[tuple[KvmMmuPage, list[tuple[KvmMmuPage, int]]]] = []

    def walk(parent: KvmMmuPage, path: list[tuple[KvmMmuPage, int]]) -> int:
        nr_unsync_leaf = 0
        bitmap = parent.unsync_child_bitmap
        while bitmap:
            low = bitmap & -bitmap
            i = low.bit_length() - 1
            bitmap ^= low
            ent = parent.spt[i]
            if not is_shadow_present_pte(ent) or is_large_pte(ent):
                clear_unsync_child_bit(parent, i)
                continue
            child = kvm.spte_to_child_sp(ent)
            if child.unsync_children:
                ret = walk(child, [(parent, i), *path])
                if not ret:
                    clear_unsync_child_bit(parent, i)
                    continue
                nr_unsync_leaf += ret
            elif child.unsync:
                nr_unsync_leaf += 1
                out.append((child, [(parent, i), *path]))
            else:
                clear_unsync_child_bit(parent, i)
        return nr_unsync_leaf

    if sp.unsync_children:
        walk(sp, [])
    return out


def mmu_pages_clear_parents(path: list[tuple[KvmMmuPage, int]]) -> None:
    for parent, index in path:
        if parent.unsync_child_bitmap & (1 << index):
            clear_unsync_child_bit(parent, index)
        if parent.unsync_children:
            return


def mmu_zap_unsync_children(kvm: Kvm, parent: KvmMmuPage, invalid_list: InvalidList) -> int:
    if parent.role.level == PG_LEVEL_4K:
        return 0
    zapped = 0
    while True:
        pages = mmu_unsync_walk(kvm, parent)
        if not pages:
            return zapped
        for sp, path in pages:
            kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            mmu_pages_clear_parents(path)
            zapped += 1


def _kvm_mmu_prepare_zap_page(kvm: Kvm, sp: KvmMmuPage, invalid_list: InvalidList) -> tuple[bool, int]:
    """Unlink @sp everywhere and queue it for freeing; return (list_unstable, nr_zapped)."""
    kvm.stat.mmu_shadow_zapped += 1
    nr_zapped = mmu_zap_unsync_children(kvm, sp, invalid_list)
    nr_zapped += kvm_mmu_page_unlink_children(kvm, sp, invalid_list)
    kvm_mmu_unlink_parents(kvm, sp)
    # Zapping children means active_mmu_pages has become unstable.
    list_unstable = nr_zapped != 0
    if not sp.role.invalid and sp_has_gptes(sp):
        unaccount_shadowed(kvm, sp)
    if sp.unsync:
        kvm_unlink_unsync_page(kvm, sp)
    zapped_root = False
    if not sp.root_count:
        nr_zapped += 1
        kvm.active_mmu_pages.pop(sp, None)
        if sp not in invalid_list:
            invalid_list.append(sp)
        kvm.n_used_mmu_pages -= 1  # kvm_unaccount_mmu_page()
    else:
        kvm.active_mmu_pages.pop(sp, None)
        zapped_root = not is_obsolete_sp(kvm, sp)
    if sp.nx_huge_page_disallowed:
        unaccount_nx_huge_page(kvm, sp)
    sp.role = sp.role.evolve(invalid=True)
    if zapped_root:
        # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: vCPUs reload their roots before the
        # next entry (mmu.kvm_mmu_reload()).
        pass
    return list_unstable, nr_zapped


def kvm_mmu_prepare_zap_page(kvm: Kvm, sp: KvmMmuPage, invalid_list: InvalidList) -> bool:
    _, nr_zapped = _kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
    return nr_zapped != 0


def kvm_mmu_free_shadow_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    bucket = kvm.mmu_page_hash.get(hash_64(sp.gfn, KVM_MMU_HASH_SHIFT), [])
    if sp in bucket:
        bucket.remove(sp)
        if not bucket:
            del kvm.mmu_page_hash[hash_64(sp.gfn, KVM_MMU_HASH_SHIFT)]
    kvm.active_mmu_pages.pop(sp, None)
    kvm.sp_by_pfn.pop(sp.pfn, None)


def kvm_mmu_commit_zap_page(kvm: Kvm, invalid_list: InvalidList) -> None:
    if not invalid_list:
        return
    # Flush before freeing: lockless walkers and vCPUs may still use the tables.
    kvm.kvm_flush_remote_tlbs("kvm_mmu_commit_zap_page")
    for sp in invalid_list:
        kvm_bug_on(not sp.role.invalid or sp.root_count != 0, "kvm_mmu_commit_zap_page", lambda: f"freeing {sp!r}")
        kvm_mmu_free_shadow_page(kvm, sp)
    invalid_list.clear()


def kvm_mmu_remote_flush_or_zap(kvm: Kvm, invalid_list: InvalidList, remote_flush: bool) -> bool:
    if not remote_flush and not invalid_list:
        return False
    if invalid_list:
        kvm_mmu_commit_zap_page(kvm, invalid_list)
    else:
        kvm.kvm_flush_remote_tlbs("kvm_mmu_remote_flush_or_zap")
    return True


def kvm_mmu_zap_oldest_mmu_pages(kvm: Kvm, nr_to_zap: int) -> int:
    total_zapped = 0
    invalid_list: InvalidList = []
    if not kvm.active_mmu_pages:
        return 0
    restart = True
    while restart:
        restart = False
        # Oldest first: the kernel walks active_mmu_pages from the tail.
        for sp in list(kvm.active_mmu_pages):
            if sp not in kvm.active_mmu_pages:
                continue
            if sp.root_count:
                continue
            unstable, nr_zapped = _kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            total_zapped += nr_zapped
            if total_zapped >= nr_to_zap:
                break
            if unstable:
                restart = True
                break
    kvm_mmu_commit_zap_page(kvm, invalid_list)
    kvm.stat.mmu_recycled += total_zapped
    return total_zapped


def make_mmu_pages_available(kvm: Kvm) -> int:
    from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES, KVM_REFILL_PAGES

    avail = kvm.kvm_mmu_available_pages()
    if avail >= KVM_MIN_FREE_MMU_PAGES:
        return 0
    kvm_mmu_zap_oldest_mmu_pages(kvm, KVM_REFILL_PAGES - avail)
    if not kvm.kvm_mmu_available_pages():
        return -28  # -ENOSPC
    return 0


def kvm_mmu_change_mmu_pages(kvm: Kvm, goal_nr_mmu_pages: int) -> None:
    if kvm.n_used_mmu_pages > goal_nr_mmu_pages:
        kvm_mmu_zap_oldest_mmu_pages(kvm, kvm.n_used_mmu_pages - goal_nr_mmu_pages)
        goal_nr_mmu_pages = kvm.n_used_mmu_pages
    kvm.n_max_mmu_pages = goal_nr_mmu_pages


def kvm_zap_obsolete_pages(kvm: Kvm) -> None:
    invalid_list: InvalidList = []
    restart = True
    while restart:
        restart = False
        for sp in list(kvm.active_mmu_pages):
            if sp not in kvm.active_mmu_pages:
                continue
            # The list is FIFO: every older page is obsolete too... but the
            # walk goes oldest-first here, so skip the valid ones instead.
            if not is_obsolete_sp(kvm, sp):
                continue
            if sp.role.invalid:
                continue
            unstable, _ = _kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
            if unstable:
                restart = True
                break
    kvm_mmu_commit_zap_page(kvm, invalid_list)


def kvm_mmu_zap_all_fast(kvm: Kvm) -> None:
    """Invalidate every page at once by bumping the generation (mmu.c)."""
    from kvmsplit import tdp_mmu

    kvm.mmu_valid_gen ^= 1
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_invalidate_all_roots(kvm)
    kvm_zap_obsolete_pages(kvm)
    kvm.mmu_unlock("kvm_mmu_zap_all_fast")
    if kvm.tdp_mmu_enabled:
        tdp_mmu.kvm_tdp_mmu_zap_invalidated_roots(kvm)


# --- roots --------------------------------------------------------------------


def mmu_alloc_root(kvm: Kvm, vcpu: KvmVcpu, ctx: KvmMmuContext, role: KvmMmuPageRole, gfn: int) -> KvmMmuPage:
    sp = kvm_mmu_get_shadow_page(kvm, vcpu, gfn, role)
    sp.root_count += 1
    return sp


def mmu_free_root_page(kvm: Kvm, sp: KvmMmuPage, invalid_list: InvalidList) -> None:
    from kvmsplit import tdp_mmu

    if sp.tdp_mmu_page:
        tdp_mmu.kvm_tdp_mmu_put_root(kvm, sp)
        return
    sp.root_count -= 1
    kvm_bug_on(sp.root_count < 0, "mmu_free_root_page", lambda: f"{sp!r} root_count < 0")
    if not sp.root_count and sp.role.invalid:
        kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)


def kvm_mmu_free_roots(kvm: Kvm, ctx: KvmMmuContext) -> None:
    if ctx.root is None:
        return
    invalid_list: InvalidList = []
    mmu_free_root_page(kvm, ctx.root, invalid_list)
    ctx.root = None
    kvm_mmu_commit_zap_page(kvm, invalid_list)


def check_gfn(kvm: Kvm, gfn: int, where: str) -> None:
    if not isinstance(gfn, int) or gfn < 0 or gfn >= 1 << 40:
        raise HarnessError(f"{where}: gfn {gfn!r} is not a 40-bit frame number")
