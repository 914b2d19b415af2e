"""Eager page splitting in both MMUs, mirroring the split code of arch/x86/kvm/mmu/mmu.c and tdp_mmu.c.

The merged kernel (v6.0 onwards, "KVM: x86/mmu: Extend Eager Page Splitting
to nested MMUs" and "Avoid unnecessary flush on eager page split") splits
when dirty logging starts (kvm_mmu_slot_try_split_huge_pages()) and when
KVM_CLEAR_DIRTY_LOG re-arms initially-set pages
(kvm_mmu_try_split_huge_pages()), and only with the TDP MMU enabled:

- the shadow MMU path walks the rmaps (1G level first, then 2M) and splits
  nested (guest_mode) huge SPTEs into direct shadow pages found or created
  through the page hash, refusing with -ENOSPC at or below
  KVM_MIN_FREE_MMU_PAGES available pages and flushing only when a reused
  page held a present non-leaf entry;
- the TDP MMU path walks every valid root pre-order and replaces each huge
  SPTE with a brand-new table, linked by compare-and-exchange, never flushing.

`MergedSplit` holds that policy as methods named after the kernel
functions, so a model variant (models/) or a mutant overrides exactly the
function it changes.  `SplitEnv` supplies the nondeterminism the kernel has
here: need_resched() and lock contention, cache top-up failure, allocation
failure, and a racing thread at the TDP compare-and-exchange.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from kvmsplit import shadow_mmu, tdp_mmu
from kvmsplit.errors import kvm_bug_on
from kvmsplit.memslot import KvmMemorySlot
from kvmsplit.mmu_page import KvmMmuPage, kvm_mmu_child_role, kvm_mmu_page_get_access, kvm_mmu_page_get_gfn
from kvmsplit.rmap import KvmMmuMemoryCache, KvmRmapHead, Sptep, rmap_iter
from kvmsplit.spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_1G,
    SPTE_ENT_PER_PAGE,
    Spte,
    _and,
    _if,
    _not,
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    make_huge_page_split_spte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm

ENOSPC = -28
EAGAIN = -11
ENOMEM = -12

SPLIT_DESC_CACHE_MIN_NR_OBJECTS = SPTE_ENT_PER_PAGE + 1
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40


@attrs.define
class SplitEnv:
    """Model: the nondeterminism of the split paths, drawn by a harness.

    Each list is consumed front to back, one entry per decision; an empty
    list means the benign outcome.  `on_lock_dropped` runs whenever the
    shadow split drops mmu_lock, so another actor can change the MMU there.
    """

    need_resched: list[bool] = attrs.field(factory=list)
    topup_fails: list[bool] = attrs.field(factory=list)
    tdp_alloc_fails: list[bool] = attrs.field(factory=list)
    on_lock_dropped: Callable[[Kvm], None] | None = None
    events: Counter[str] = attrs.field(factory=Counter)
    # Model: the fewest available shadow pages any split left behind.
    min_available_after_split: int | None = None
    # Model: called with a SplitRecord after every huge page a split
    # replaced (the transition invariants of properties/ watch here).
    observers: list[Callable[[Kvm, SplitRecord], None]] = attrs.field(factory=list)
    # Model: called with a SplitPass after every call of the two split entry
    # points (the pass invariants of properties/ watch here).
    pass_observers: list[Callable[[Kvm, SplitPass], None]] = attrs.field(factory=list)

    @staticmethod
    def _pop(q: list[bool]) -> bool:
        return q.pop(0) if q else False


@attrs.define(eq=False)
class SplitRecord:
    """Model: one huge SPTE as a split found it, and what replaced it.

    Taken before the split only while someone observes splits, so plain runs
    pay nothing for it.
    """

    mmu: str  # "shadow" or "tdp"
    huge_sptep: Sptep
    huge_spte: int
    level: int
    gfn: int
    flush_requests: int
    cache_misses: int
    # pages_4k, pages_2m, pages_1g before the split.
    stats: tuple[int, ...] = ()
    # Entries of the page a shadow split will reuse that are not present yet
    # (SPTE_ENT_PER_PAGE when there is no page to reuse).
    nonpresent_before: int = SPTE_ENT_PER_PAGE
    # Unsync pages at the split page's gfn, with their present leaves.
    unsync_at_gfn: list[tuple[KvmMmuPage, int]] = attrs.field(factory=list)
    child: KvmMmuPage | None = None
    flushed: bool = False
    reused: bool = False


def observe_split(kvm: Kvm, mmu: str, huge_sptep: Sptep, gfn: int) -> SplitRecord | None:
    if not kvm.model_split_env.observers:
        return None
    rec = SplitRecord(
        mmu=mmu,
        huge_sptep=huge_sptep,
        huge_spte=huge_sptep.spte,
        level=huge_sptep.sp.role.level,
        gfn=gfn,
        flush_requests=kvm.stat.remote_tlb_flush_requests,
        cache_misses=kvm.stat.mmu_cache_miss,
        stats=tuple(kvm.stat.pages),
    )
    if mmu == "shadow":
        # The page kvm_mmu_get_shadow_page() will find, if any, as the
        # faithful shadow_mmu_get_sp_for_split() derives its role.
        sp, index = huge_sptep.sp, huge_sptep.index
        role = kvm_mmu_child_role(sp, index, True, kvm_mmu_page_get_access(sp, index))
        for old in shadow_mmu.for_each_valid_sp(kvm, gfn):
            if old.gfn != gfn:
                continue
            if old.role.word == role.word:
                rec.nonpresent_before = sum(1 for v in old.spt if not is_shadow_present_pte(v))
            elif old.unsync:
                # kvm_mmu_find_shadow_page() may zap it; if so its leaves leave the stats.
                rec.unsync_at_gfn.append((old, sum(1 for v in old.spt if is_shadow_present_pte(v))))
    return rec


def split_observed(kvm: Kvm, rec: SplitRecord | None) -> None:
    """Hand a finished split to the observers: the huge SPTE now links rec.child."""
    if rec is None:
        return
    rec.child = kvm.sp_by_pfn.get(spte_to_pfn(rec.huge_sptep.spte))
    rec.flushed = kvm.stat.remote_tlb_flush_requests > rec.flush_requests
    rec.reused = rec.mmu == "shadow" and kvm.stat.mmu_cache_miss == rec.cache_misses
    for observer in kvm.model_split_env.observers:
        observer(kvm, rec)


@attrs.define(eq=False)
class SplitPass:
    """Model: one call of kvm_mmu_slot_try_split_huge_pages() or kvm_mmu_try_split_huge_pages()."""

    slot: KvmMemorySlot
    start: int
    end: int
    target_level: int
    splits: list[SplitRecord] = attrs.field(factory=list)
    # -ENOSPC and -ENOMEM outcomes during the pass: each may leave huge pages.
    errors: int = 0


def _observed_pass(
    kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int, run: Callable[[], None]
) -> None:
    env = kvm.model_split_env
    if not env.pass_observers:
        run()
        return
    p = SplitPass(slot, start, end, target_level)

    def collect(k: Kvm, rec: SplitRecord) -> None:
        p.splits.append(rec)

    errors = env.events["enospc"] + env.events["enomem"]
    env.observers.append(collect)
    try:
        run()
    finally:
        env.observers.remove(collect)
    p.errors = env.events["enospc"] + env.events["enomem"] - errors
    for observer in env.pass_observers:
        observer(kvm, p)


@attrs.define(eq=False)
class SplitCaches:
    """kvm->arch.split_desc_cache, split_page_header_cache, split_shadow_page_cache."""

    desc: KvmMmuMemoryCache = attrs.field(
        factory=lambda: KvmMmuMemoryCache(
            "split_desc_cache", SPLIT_DESC_CACHE_MIN_NR_OBJECTS + KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
        )
    )
    page_header: KvmMmuMemoryCache = attrs.field(
        factory=lambda: KvmMmuMemoryCache("split_page_header_cache", KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
    )
    shadow_page: KvmMmuMemoryCache = attrs.field(
        factory=lambda: KvmMmuMemoryCache("split_shadow_page_cache", KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
    )


def split_env(kvm: Kvm) -> SplitEnv:
    return kvm.model_split_env


def split_caches(kvm: Kvm) -> SplitCaches:
    return kvm.model_split_caches


class MergedSplit:
    """Eager page splitting as merged in Linux v6.0 and kept since."""

    name = "merged"

    # --- entry points (mmu.c) --------------------------------------------------

    def kvm_mmu_slot_try_split_huge_pages(self, kvm: Kvm, slot: KvmMemorySlot, target_level: int) -> None:
        """Split a whole slot when dirty logging starts; no flush (the caller's write-protect flushes)."""
        if not kvm.tdp_mmu_enabled:
            return
        start, end = slot.base_gfn, slot.end_gfn
        if kvm.kvm_memslots_have_rmaps():
            self.kvm_shadow_mmu_try_split_huge_pages(kvm, slot, start, end, target_level)
            kvm.mmu_unlock("kvm_mmu_slot_try_split_huge_pages rmap")
        self.kvm_tdp_mmu_try_split_huge_pages(kvm, slot, start, end, target_level, True)
        kvm.mmu_unlock("kvm_mmu_slot_try_split_huge_pages tdp")

    def kvm_mmu_try_split_huge_pages(
        self, kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int
    ) -> None:
        """Split [start, end) for KVM_CLEAR_DIRTY_LOG, under the caller's mmu_lock held for write."""
        if not kvm.tdp_mmu_enabled:
            return
        if kvm.kvm_memslots_have_rmaps():
            self.kvm_shadow_mmu_try_split_huge_pages(kvm, slot, start, end, target_level)
        self.kvm_tdp_mmu_try_split_huge_pages(kvm, slot, start, end, target_level, False)

    # --- shadow MMU (rmap) path ------------------------------------------------

    def kvm_shadow_mmu_try_split_huge_pages(
        self, kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int
    ) -> None:
        # Split from KVM_MAX_HUGEPAGE_LEVEL down, so 2M pages made from 1G
        # pages land in the 2M rmaps before that pass walks them.
        for level in range(KVM_MAX_HUGEPAGE_LEVEL, target_level, -1):
            shadow_mmu.walk_slot_rmaps(
                kvm,
                slot,
                lambda k, head, s, gfn, lvl: self.shadow_mmu_try_split_huge_pages(k, head, s),
                level,
                level,
                start,
                end - 1,
            )

    def skip_split(self, kvm: Kvm, huge_sptep: Sptep) -> bool:
        """The skip rules at the top of the rmap loop; True to skip this SPTE."""
        sp = huge_sptep.sp
        # The TDP MMU is enabled, so the rmaps hold only nested (L2) pages.
        kvm_bug_on(not sp.role.guest_mode, "shadow_mmu_try_split_huge_pages", lambda: f"{sp!r} is not guest_mode")
        # rmaps hold only leaves, and leaves above 4K are large.
        kvm_bug_on(
            not is_large_pte(huge_sptep.spte), "shadow_mmu_try_split_huge_pages", lambda: f"{huge_sptep!r} not large"
        )
        # Pages above 4K are write-tracked and can never be unsync.
        kvm_bug_on(sp.unsync, "shadow_mmu_try_split_huge_pages", lambda: f"{sp!r} holding a huge SPTE is unsync")
        return bool(sp.role.invalid)

    def shadow_mmu_try_split_huge_pages(self, kvm: Kvm, rmap_head: KvmRmapHead, slot: KvmMemorySlot) -> bool:
        """Split every huge SPTE of one rmap head; stop this head on -ENOSPC or -ENOMEM."""
        env = split_env(kvm)
        restart = True
        while restart:
            restart = False
            for huge_sptep in rmap_iter(rmap_head):
                if self.skip_split(kvm, huge_sptep):
                    continue
                r = self.shadow_mmu_try_split_huge_page(kvm, slot, huge_sptep)
                # The split took the SPTE out of this rmap, or the lock was dropped.
                if r == 0 or r == EAGAIN:
                    restart = True
                    break
                env.events["shadow_head_stopped"] += 1
                break
        return False

    def shadow_mmu_try_split_huge_page(self, kvm: Kvm, slot: KvmMemorySlot, huge_sptep: Sptep) -> int:
        env = split_env(kvm)
        if self.split_lacks_free_mmu_pages(kvm.kvm_mmu_available_pages()):
            env.events["enospc"] += 1
            return ENOSPC
        if self.need_topup_split_caches_or_resched(kvm):
            kvm.mmu_unlock("shadow_mmu_try_split_huge_page")
            if env.on_lock_dropped is not None:
                env.on_lock_dropped(kvm)
            r = self.topup_split_caches(kvm)
            if r:
                env.events["enomem"] += 1
                return r
            env.events["eagain"] += 1
            return EAGAIN
        rec = observe_split(kvm, "shadow", huge_sptep, kvm_mmu_page_get_gfn(huge_sptep.sp, huge_sptep.index))
        self.shadow_mmu_split_huge_page(kvm, slot, huge_sptep)
        split_observed(kvm, rec)
        return 0

    def split_lacks_free_mmu_pages(self, available_pages: Any) -> Any:
        """Model: the -ENOSPC test of shadow_mmu_try_split_huge_page().

        Kept apart as a pure comparison so the Z3 guard query
        (properties/smt) runs this very code on a symbolic page count.
        """
        from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES

        return available_pages <= KVM_MIN_FREE_MMU_PAGES

    def need_topup_split_caches_or_resched(self, kvm: Kvm) -> bool:
        env = split_env(kvm)
        caches = split_caches(kvm)
        if SplitEnv._pop(env.need_resched):
            return True
        return (
            caches.desc.nobjs < SPLIT_DESC_CACHE_MIN_NR_OBJECTS
            or caches.page_header.nobjs < 1
            or caches.shadow_page.nobjs < 1
        )

    def topup_split_caches(self, kvm: Kvm) -> int:
        env = split_env(kvm)
        if SplitEnv._pop(env.topup_fails):
            return ENOMEM
        caches = split_caches(kvm)
        for cache in (caches.desc, caches.page_header, caches.shadow_page):
            cache.nobjs = cache.capacity
        return 0

    def shadow_mmu_get_sp_for_split(self, kvm: Kvm, huge_sptep: Sptep) -> KvmMmuPage:
        huge_sp = huge_sptep.sp
        index = huge_sptep.index
        gfn = kvm_mmu_page_get_gfn(huge_sp, index)
        access = kvm_mmu_page_get_access(huge_sp, index)
        # The huge page is mapped directly by smaller pages, whatever its owner.
        role = kvm_mmu_child_role(huge_sp, index, True, access)
        caches = split_caches(kvm)
        before = kvm.stat.mmu_cache_miss
        sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, gfn, role, (caches.page_header, caches.shadow_page))
        if kvm.stat.mmu_cache_miss == before:
            split_env(kvm).events["reuse"] += 1
        return sp

    def shadow_mmu_split_huge_page(self, kvm: Kvm, slot: KvmMemorySlot, huge_sptep: Sptep) -> None:
        env = split_env(kvm)
        caches = split_caches(kvm)
        huge_spte = huge_sptep.spte
        level = huge_sptep.sp.role.level
        sp = self.shadow_mmu_get_sp_for_split(kvm, huge_sptep)
        flush = False
        for index in range(SPTE_ENT_PER_PAGE):
            spte = sp.spt[index]
            child_spte, child_flush = self.shadow_mmu_split_child(kvm, huge_spte, sp, index, spte)
            flush |= child_flush
            if is_shadow_present_pte(spte):
                continue
            sptep = Sptep(sp, index)
            shadow_mmu.mmu_spte_set(kvm, sptep, child_spte)
            shadow_mmu.rmap_add(kvm, slot, sptep, kvm_mmu_page_get_gfn(sp, index), sp.role.access, caches.desc)
        avail = kvm.kvm_mmu_available_pages()
        if env.min_available_after_split is None or avail < env.min_available_after_split:
            env.min_available_after_split = avail
        if flush:
            env.events["reuse_nonleaf_flush"] += 1
        env.events[f"shadow_split_{'1g' if level == PG_LEVEL_1G else '2m'}"] += 1
        self.link_split_page(kvm, huge_sptep, sp, flush)

    def shadow_mmu_split_child(
        self, kvm: Kvm, huge_spte: Spte, sp: KvmMmuPage, index: Spte, spte: Spte
    ) -> tuple[Spte, Any]:
        """Model: one pass of the loop in shadow_mmu_split_huge_page().

        Return the value entry @index of @sp holds after the split, given that
        it holds @spte before, and whether that entry makes the split flush.
        Pure and branch-free on the SPTEs, so the Z3 split-loop queries
        (properties/smt) run this very code over a symbolic table.
        """
        present = is_shadow_present_pte(spte)
        # Same gfn-to-pfn translation (the page is direct), but a lower table
        # may be partly filled: installing it unmaps part of the huge page,
        # and unmapping always needs a flush.
        flush = _and(present, self.reused_child_needs_flush(spte, sp.role.level))
        child_spte = _if(present, spte, self.make_huge_page_split_spte(kvm, huge_spte, sp, index))
        return child_spte, flush

    def reused_child_needs_flush(self, child_spte: Spte, child_level: int) -> Any:
        return _not(is_last_spte(child_spte, child_level))

    def link_split_page(self, kvm: Kvm, huge_sptep: Sptep, sp: KvmMmuPage, flush: bool) -> None:
        """_link_shadow_page(kvm, split_desc_cache, huge_sptep, sp, flush)."""
        shadow_mmu._link_shadow_page(kvm, huge_sptep, sp, flush, split_caches(kvm).desc)

    def make_huge_page_split_spte(self, kvm: Kvm, huge_spte: Spte, sp: KvmMmuPage, index: Spte) -> Spte:
        return make_huge_page_split_spte(
            kvm.masks, huge_spte, sp.role.level, sp.role.access, index, kvm.is_nx_huge_page_enabled()
        )

    # --- TDP MMU path (tdp_mmu.c) ------------------------------------------------

    def kvm_tdp_mmu_try_split_huge_pages(
        self, kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int, shared: bool
    ) -> None:
        for root in tdp_mmu.tdp_mmu_roots(kvm, only_valid=True):
            r = self.tdp_mmu_split_huge_pages_root(kvm, root, start, end, target_level, shared)
            if r:
                # An error stops every remaining root.
                split_env(kvm).events["tdp_roots_stopped"] += 1
                break

    def tdp_mmu_split_huge_pages_root(
        self, kvm: Kvm, root: KvmMmuPage, start: int, end: int, target_level: int, shared: bool
    ) -> int:
        env = split_env(kvm)
        ret = 0
        sp: KvmMmuPage | None = None
        # Pre-order: a 1G page is split before the walk steps into its new
        # 2M table, so one pass splits all the way to @target_level.
        for it in tdp_mmu.for_each_tdp_pte_min_level(kvm, root, target_level + 1, start, end):
            while True:
                if SplitEnv._pop(env.need_resched):
                    # tdp_mmu_iter_cond_resched(): yield, then re-read this SPTE.
                    env.events["tdp_yield"] += 1
                    it.old_spte = it.sptep.spte
                if not is_shadow_present_pte(it.old_spte) or not is_large_pte(it.old_spte):
                    break
                if sp is None:
                    sp = self.tdp_mmu_alloc_sp_for_split(kvm)
                    if sp is None:
                        env.events["enomem"] += 1
                        return ENOMEM
                tdp_mmu.tdp_mmu_init_child_sp(sp, it)
                level = it.level
                rec = observe_split(kvm, "tdp", it.sptep, it.gfn)
                if rec is not None:
                    rec.huge_spte = it.old_spte
                if tdp_mmu.tdp_mmu_split_huge_page(kvm, it, sp, shared):
                    # Lost the race: it.old_spte holds the new value; retry from it.
                    env.events["tdp_race_lost"] += 1
                    continue
                env.events[f"tdp_split_{'1g' if level == PG_LEVEL_1G else '2m'}"] += 1
                split_observed(kvm, rec)
                sp = None
                break
        return ret

    def tdp_mmu_alloc_sp_for_split(self, kvm: Kvm) -> KvmMmuPage | None:
        env = split_env(kvm)
        if SplitEnv._pop(env.tdp_alloc_fails):
            return None
        return tdp_mmu.tdp_mmu_alloc_sp(kvm)


MERGED = MergedSplit()


def split_policy(kvm: Kvm) -> MergedSplit:
    return kvm.model_split_policy or MERGED


def kvm_mmu_slot_try_split_huge_pages(kvm: Kvm, slot: KvmMemorySlot, target_level: int) -> None:
    _observed_pass(
        kvm,
        slot,
        slot.base_gfn,
        slot.end_gfn,
        target_level,
        lambda: split_policy(kvm).kvm_mmu_slot_try_split_huge_pages(kvm, slot, target_level),
    )


def kvm_mmu_try_split_huge_pages(kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int) -> None:
    _observed_pass(
        kvm,
        slot,
        start,
        end,
        target_level,
        lambda: split_policy(kvm).kvm_mmu_try_split_huge_pages(kvm, slot, start, end, target_level),
    )
