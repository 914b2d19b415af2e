"""Named whole-state invariants of the reference MMU (kernel-brief section 13).

Each function states one fact about a `Kvm`, names the kernel function that
relies on it, and the mutant in models/mutants/ that breaks it.  They walk
only what exists (live page tables, populated rmaps, cached TLB entries),
never all of guest memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise

from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, gfn_to_index
from kvmsplit.mmu_page import (
    KVM_MMU_HASH_SHIFT,
    KvmMmuPage,
    hash_64,
    kvm_mmu_child_role,
    kvm_mmu_page_get_gfn,
    sp_has_gptes,
)
from kvmsplit.rmap import pte_list_count, pte_list_desc_shape_ok, rmap_iter
from kvmsplit.shadow_mmu import is_obsolete_sp
from kvmsplit.spte import (
    ACC_WRITE_MASK,
    KVM_HPAGE_GFN_SHIFT,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_ENT_PER_PAGE,
    is_executable_pte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_removed_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_access,
    spte_ad_enabled,
    spte_to_pfn,
    spte_writable_triad_holds,
)
from kvmsplit.tdp_mmu import for_each_tdp_pte_min_level

from .registry import fail, invariant

# --- helpers ---------------------------------------------------------------------

SPTE_MMU_PRESENT = 1 << 11


def live_pages(kvm: Kvm) -> list[KvmMmuPage]:
    """Every page table that exists: shadow pages not yet freed and linked TDP tables."""
    return list(kvm.sp_by_pfn.values())


# Model: within one check round the MMU cannot change, so the non-zero
# entries of each table are read once and shared by every invariant.
_round_cache: dict[int, list[tuple[int, int]]] | None = None


@contextmanager
def check_round() -> Iterator[None]:
    """Share table reads among the invariants of one round (the checker's)."""
    global _round_cache
    _round_cache = {}
    try:
        yield
    finally:
        _round_cache = None


def sptes(sp: KvmMmuPage) -> list[tuple[int, int]]:
    """The (index, spte) pairs of @sp's non-zero entries."""
    if _round_cache is not None:
        cached = _round_cache.get(id(sp))
        if cached is None:
            cached = _round_cache[id(sp)] = [(i, v) for i, v in enumerate(sp.spt) if v]
        return cached
    return [(i, v) for i, v in enumerate(sp.spt) if v]


def present_leaves(kvm: Kvm) -> list[tuple[KvmMmuPage, int, int]]:
    """(sp, index, spte) for every present leaf SPTE in every live table."""
    if _round_cache is not None and -1 in _round_cache:
        return _round_cache[-1]  # type: ignore[return-value]
    out = []
    for sp in live_pages(kvm):
        level = sp.role.level
        for i, spte in sptes(sp):
            if spte & SPTE_MMU_PRESENT and (level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK):
                out.append((sp, i, spte))
    if _round_cache is not None:
        _round_cache[-1] = out  # type: ignore[assignment]
    return out


def leaf_gfn_range(sp: KvmMmuPage, index: int) -> tuple[int, int]:
    base = kvm_mmu_page_get_gfn(sp, index)
    return base, base + KVM_PAGES_PER_HPAGE(sp.role.level)


# --- SPTE level ------------------------------------------------------------------


@invariant(kernel="check_spte_writable_invariants()", mutant="mutants/split_child_drops_host_writable")
def leaf_spte_writable_triad(kvm: Kvm) -> None:
    """Every present leaf: W implies MMU-writable, and MMU-writable implies Host-writable."""
    for sp, i, spte in present_leaves(kvm):
        if not spte_writable_triad_holds(kvm.masks, spte):
            fail("leaf_spte_writable_triad", f"{sp!r}[{i}] = {spte:#x} breaks W => MMU-writable => Host-writable")


@invariant(kernel="make_nonleaf_spte(), kvm_mmu_child_role()", mutant="mutants/split_link_not_executable")
def nonleaf_spte_points_at_child_table(kvm: Kvm) -> None:
    """A present non-leaf SPTE is never PS, grants all access, and points at a live table one level down."""
    m = kvm.masks
    for sp in live_pages(kvm):
        level = sp.role.level
        for i, spte in sptes(sp):
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                continue
            if spte & PT_PAGE_SIZE_MASK:
                fail("nonleaf_spte_points_at_child_table", f"{sp!r}[{i}] non-leaf has PS: {spte:#x}")
            if not (spte & PT_WRITABLE_MASK and spte & m.shadow_user_mask and is_executable_pte(m, spte)):
                fail("nonleaf_spte_points_at_child_table", f"{sp!r}[{i}] non-leaf is not ACC_ALL: {spte:#x}")
            child = kvm.sp_by_pfn.get(spte_to_pfn(spte))
            if child is None:
                fail("nonleaf_spte_points_at_child_table", f"{sp!r}[{i}] points at no live table: {spte:#x}")
                return
            if child.role.level != level - 1:
                fail("nonleaf_spte_points_at_child_table", f"{sp!r}[{i}] points at level {child.role.level} {child!r}")


@invariant(kernel="is_shadow_present_pte(), make_mmio_spte(), REMOVED_SPTE", mutant="mutants/tdp_zap_leaves_frozen")
def only_present_leaves_or_mmio_in_tables(kvm: Kvm) -> None:
    """Between operations no SPTE is frozen, and a non-present SPTE is zero or an MMIO SPTE."""
    m = kvm.masks
    for sp in live_pages(kvm):
        for i, spte in sptes(sp):
            if is_removed_spte(spte):
                fail("only_present_leaves_or_mmio_in_tables", f"{sp!r}[{i}] is left frozen")
            if not is_shadow_present_pte(spte) and not is_mmio_spte(m, spte):
                fail("only_present_leaves_or_mmio_in_tables", f"{sp!r}[{i}] holds junk {spte:#x}")


@invariant(kernel="make_spte(), make_huge_page_split_spte()", mutant="mutants/split_keeps_ps_at_4k")
def leaf_size_matches_level(kvm: Kvm) -> None:
    """A 4K leaf has no PS bit; a leaf above 4K has it."""
    for sp, i, spte in present_leaves(kvm):
        if sp.role.level == PG_LEVEL_4K and spte & PT_PAGE_SIZE_MASK:
            fail("leaf_size_matches_level", f"4K leaf {sp!r}[{i}] has PS: {spte:#x}")


@invariant(kernel="make_spte() (NX huge page mitigation)", mutant="mutants/split_exec_at_2m")
def nx_huge_page_not_executable(kvm: Kvm) -> None:
    """With the NX huge page mitigation, no present leaf above 4K is executable."""
    if not kvm.is_nx_huge_page_enabled():
        return
    for sp, i, spte in present_leaves(kvm):
        if sp.role.level > PG_LEVEL_4K and is_executable_pte(kvm.masks, spte):
            fail("nx_huge_page_not_executable", f"huge leaf {sp!r}[{i}] is executable: {spte:#x}")


@invariant(kernel="make_spte(), kvm_mmu_slot_apply_flags()", mutant="mutants/wrprot_skips_unsplit_huge")
def dirty_logged_slot_has_no_writable_huge_leaf(kvm: Kvm) -> None:
    """No writable leaf above 4K maps a gfn of a dirty-logged slot (initially-set mode excepted)."""
    if kvm.kvm_dirty_log_manual_protect_and_init_set():
        return
    for sp, i, spte in present_leaves(kvm):
        if sp.role.level == PG_LEVEL_4K or not is_writable_pte(spte):
            continue
        start, end = leaf_gfn_range(sp, i)
        for slot in kvm.memslots.values():
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES and start < slot.end_gfn and slot.base_gfn < end:
                fail(
                    "dirty_logged_slot_has_no_writable_huge_leaf",
                    f"writable level-{sp.role.level} leaf {sp!r}[{i}] maps gfn {start:#x} in dirty-logged slot {slot.id}",
                )


@invariant(
    kernel="kvm_mmu_slot_apply_flags(), kvm_get_dirty_log_protect(), mark_page_dirty_in_slot()",
    mutant="mutants/fast_pf_no_mark_dirty",
)
def dirty_log_records_every_write(kvm: Kvm) -> None:
    """Every gfn the guest wrote after logging started is set in the dirty bitmap until userspace harvests it."""
    for slot in kvm.memslots.values():
        bitmap = slot.dirty_bitmap
        if bitmap is None:
            continue
        for gfn in slot.model_written:
            rel = gfn - slot.base_gfn
            if not bitmap[rel >> 3] & (1 << (rel & 7)):
                fail(
                    "dirty_log_records_every_write",
                    f"the guest wrote gfn {gfn:#x} in logged slot {slot.id}, but its dirty bit is clear",
                )


@invariant(
    kernel="make_huge_page_split_spte(), kvm_mmu_notifier_invalidate_range_start()",
    mutant="mutants/split_child_indirect",
)
def leaf_maps_the_host_pfn_of_its_gfn(kvm: Kvm) -> None:
    """Every present leaf maps exactly the host pfn that backs the gfn it records (the notifier keeps this true)."""
    for sp, i, spte in present_leaves(kvm):
        gfn = kvm_mmu_page_get_gfn(sp, i)
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            fail("leaf_maps_the_host_pfn_of_its_gfn", f"{sp!r}[{i}] records gfn {gfn:#x}, which is in no memslot")
            return
        found = kvm.host._lookup(slot.gfn_to_hva(gfn))
        if found is None:
            fail("leaf_maps_the_host_pfn_of_its_gfn", f"{sp!r}[{i}] maps gfn {gfn:#x}, whose host page is gone")
            return
        level, base = found
        hva_page = slot.gfn_to_hva(gfn) >> PAGE_SHIFT
        host_pfn = base + (hva_page & (KVM_PAGES_PER_HPAGE(level) - 1))
        if (spte & _BASE_MASK) >> PAGE_SHIFT != host_pfn:
            fail(
                "leaf_maps_the_host_pfn_of_its_gfn",
                f"{sp!r}[{i}] maps gfn {gfn:#x} to pfn {(spte & _BASE_MASK) >> PAGE_SHIFT:#x}, the host backs it with {host_pfn:#x}",
            )


# --- shadow page structure -----------------------------------------------------------


@invariant(kernel="kvm_mmu_find_shadow_page(), kvm_mmu_alloc_shadow_page()", mutant="mutants/split_always_allocates")
def shadow_page_hash_unique(kvm: Kvm) -> None:
    """At most one valid shadow page per (gfn, role), each in bucket hash_64(gfn, 12)."""
    seen: dict[tuple[int, int], KvmMmuPage] = {}
    for bucket_id, bucket in kvm.mmu_page_hash.items():
        for sp in bucket:
            if hash_64(sp.gfn, KVM_MMU_HASH_SHIFT) != bucket_id:
                fail("shadow_page_hash_unique", f"{sp!r} sits in bucket {bucket_id}")
            if is_obsolete_sp(kvm, sp):
                continue
            key = (sp.gfn, sp.role.word)
            if key in seen:
                fail("shadow_page_hash_unique", f"{sp!r} duplicates {seen[key]!r}")
            seen[key] = sp
    for sp in kvm.active_mmu_pages:
        if sp not in kvm.mmu_page_hash.get(hash_64(sp.gfn, KVM_MMU_HASH_SHIFT), []):
            fail("shadow_page_hash_unique", f"active {sp!r} is not hashed")


@invariant(kernel="kvm_mmu_page_get_gfn(), tdp_mmu_init_child_sp()", mutant="mutants/tdp_split_child_gfn_unaligned")
def direct_page_gfn_aligned(kvm: Kvm) -> None:
    """A direct page's gfn is aligned to the span it maps (512^level pages)."""
    for sp in live_pages(kvm):
        if sp.role.direct and not sp.role.invalid:
            span = KVM_PAGES_PER_HPAGE(sp.role.level + 1) if sp.role.level < 5 else 1 << 36
            if sp.gfn % span:
                fail("direct_page_gfn_aligned", f"{sp!r} gfn is not aligned to {span:#x}")


@invariant(kernel="kvm_mmu_child_role(), tdp_mmu_init_child_sp()", mutant="mutants/split_child_role_drops_guest_mode")
def child_role_matches_parent(kvm: Kvm) -> None:
    """A linked child's role is the parent's child role for that entry, and a direct child maps the entry's gfn."""
    for sp in live_pages(kvm):
        level = sp.role.level
        for i, spte in sptes(sp):
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                continue
            child = kvm.sp_by_pfn.get(spte_to_pfn(spte))
            if child is None:
                continue  # nonleaf_spte_points_at_child_table reports it
            if sp.tdp_mmu_page:
                want = sp.role.evolve(level=level - 1)
                gfn = sp.gfn + i * KVM_PAGES_PER_HPAGE(level)
            else:
                want = kvm_mmu_child_role(sp, i, child.role.direct, child.role.access)
                # An indirect parent records translations for leaves only; the
                # gfn of its direct child comes from the guest PTE.
                gfn = kvm_mmu_page_get_gfn(sp, i) if sp.role.direct else child.gfn
            got = child.role.evolve(invalid=sp.role.invalid) if not child.role.invalid else child.role
            if got.word != want.word:
                fail("child_role_matches_parent", f"{sp!r}[{i}] -> {child!r}, expected {want!r}")
            if child.role.direct and child.gfn != gfn:
                fail("child_role_matches_parent", f"{sp!r}[{i}] -> {child!r}, expected gfn {gfn:#x}")


@invariant(kernel="__link_shadow_page(), drop_parent_pte()", mutant="mutants/split_no_parent_pte")
def parent_ptes_match_links(kvm: Kvm) -> None:
    """sptep is in C.parent_ptes exactly when *sptep is a present non-leaf pointing at C."""
    links: dict[int, set[tuple[int, int]]] = {}
    for sp in live_pages(kvm):
        if sp.tdp_mmu_page:
            continue
        level = sp.role.level
        for i, spte in sptes(sp):
            if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                links.setdefault(spte_to_pfn(spte), set()).add((id(sp), i))
    for sp in live_pages(kvm):
        if sp.tdp_mmu_page:
            continue
        got = {(id(p.sp), p.index) for p in rmap_iter(sp.parent_ptes)}
        want = links.get(sp.pfn, set())
        if got != want:
            fail("parent_ptes_match_links", f"{sp!r} parent_ptes has {len(got)} entries, {len(want)} SPTEs point at it")
        shape = pte_list_desc_shape_ok(sp.parent_ptes)
        if shape:
            fail("parent_ptes_match_links", f"{sp!r} parent_ptes: {shape}")


@invariant(kernel="__rmap_add(), rmap_remove(), rmap_get_first()", mutant="mutants/split_no_rmap")
def rmap_holds_exactly_present_leaves(kvm: Kvm) -> None:
    """The rmaps hold exactly the present leaf SPTEs of shadow pages, under the gfn and level they map."""
    want: Counter[tuple[int, int, int, int, int]] = Counter()
    for sp in live_pages(kvm):
        if sp.tdp_mmu_page:
            continue
        level = sp.role.level
        for i, spte in sptes(sp):
            if is_shadow_present_pte(spte) and is_last_spte(spte, level):
                gfn = kvm_mmu_page_get_gfn(sp, i)
                slot = kvm.gfn_to_memslot(gfn)
                if slot is None:
                    fail("rmap_holds_exactly_present_leaves", f"{sp!r}[{i}] maps gfn {gfn:#x} outside every slot")
                    return
                want[(slot.id, level, gfn_to_index(gfn, slot.base_gfn, level), id(sp), i)] += 1
    got: Counter[tuple[int, int, int, int, int]] = Counter()
    for slot in kvm.memslots.values():
        for level0, heads in enumerate(slot.rmap):
            for index, head in heads.items():
                shape = pte_list_desc_shape_ok(head)
                if shape:
                    fail(
                        "rmap_holds_exactly_present_leaves", f"slot {slot.id} level {level0 + 1} rmap {index}: {shape}"
                    )
                if pte_list_count(head) == 0:
                    fail("rmap_holds_exactly_present_leaves", f"slot {slot.id} keeps an empty rmap head {index}")
                for sptep in rmap_iter(head):
                    got[(slot.id, level0 + 1, index, id(sptep.sp), sptep.index)] += 1
    if got != want:
        missing = want - got
        extra = got - want
        fail(
            "rmap_holds_exactly_present_leaves",
            f"{sum(missing.values())} present leaves missing from rmaps, {sum(extra.values())} rmap entries not present leaves",
        )


@invariant(kernel="mmu_try_to_unsync_pages(), kvm_sync_page_check()", mutant="mutants/split_allows_unsync_owner")
def no_unsync_huge_sp(kvm: Kvm) -> None:
    """Only indirect 4K pages that shadow guest PTEs can be unsync."""
    for sp in live_pages(kvm):
        if sp.unsync and (sp.role.direct or not sp_has_gptes(sp) or sp.role.level != PG_LEVEL_4K):
            fail("no_unsync_huge_sp", f"{sp!r} is unsync")


@invariant(kernel="mark_unsync(), clear_unsync_child_bit()", mutant="mutants/unsync_child_bit_not_cleared")
def unsync_children_counted(kvm: Kvm) -> None:
    """unsync_children counts the child bitmap, and an unsync page is marked in every parent."""
    for sp in live_pages(kvm):
        if sp.tdp_mmu_page:
            continue
        if sp.unsync_children != bin(sp.unsync_child_bitmap).count("1"):
            fail(
                "unsync_children_counted",
                f"{sp!r} unsync_children={sp.unsync_children} bitmap={sp.unsync_child_bitmap:#x}",
            )
        if sp.unsync or sp.unsync_children:
            for p in rmap_iter(sp.parent_ptes):
                if not p.sp.unsync_child_bitmap & (1 << p.index):
                    fail("unsync_children_counted", f"{sp!r} is unsync below {p!r} but the parent bit is clear")


@invariant(
    kernel="account_shadowed(), __kvm_write_track_add_gfn(), mmu_try_to_unsync_pages()",
    mutant="mutants/account_shadowed_no_write_track",
)
def shadowed_gfns_write_protected(kvm: Kvm) -> None:
    """Upper-level guest tables are write-tracked once each; no writable SPTE maps a tracked gfn or a synced 4K guest table."""
    if not kvm.shadow_root_allocated and kvm.config.tdp_enabled:
        return
    tracked: Counter[int] = Counter()
    synced_4k: set[int] = set()
    accounted = 0
    for sp in live_pages(kvm):
        if sp.tdp_mmu_page or sp.role.invalid or not sp_has_gptes(sp):
            continue
        accounted += 1
        if sp.role.level > PG_LEVEL_4K:
            tracked[sp.gfn] += 1
        elif not sp.unsync:
            synced_4k.add(sp.gfn)
    if accounted != kvm.indirect_shadow_pages:
        fail(
            "shadowed_gfns_write_protected",
            f"indirect_shadow_pages={kvm.indirect_shadow_pages}, {accounted} accounted pages",
        )
    for slot in kvm.memslots.values():
        for index, count in slot.gfn_write_track.items():
            gfn = slot.base_gfn + index
            if count != tracked.get(gfn, 0):
                fail(
                    "shadowed_gfns_write_protected",
                    f"gfn {gfn:#x} write-track count {count}, {tracked.get(gfn, 0)} upper-level pages",
                )
    for gfn, n in tracked.items():
        owner = kvm.gfn_to_memslot(gfn)
        if owner is not None and owner.gfn_write_track.get(gfn - owner.base_gfn, 0) != n:
            fail("shadowed_gfns_write_protected", f"gfn {gfn:#x} is shadowed above 4K but not write-tracked")
    protected = set(tracked) | synced_4k
    if not protected:
        return
    for sp, i, spte in present_leaves(kvm):
        if not is_writable_pte(spte):
            continue
        start, end = leaf_gfn_range(sp, i)
        hit = next((g for g in protected if start <= g < end), None)
        if hit is not None:
            fail("shadowed_gfns_write_protected", f"writable {sp!r}[{i}] maps shadowed guest table gfn {hit:#x}")


# --- accounting ---------------------------------------------------------------------------


@invariant(
    kernel="shadow_mmu_try_split_huge_page() (the KVM_MIN_FREE_MMU_PAGES guard)", mutant="mutants/split_guard_lt"
)
def split_keeps_min_free_pages(kvm: Kvm) -> None:
    """No shadow-MMU split ever leaves fewer than KVM_MIN_FREE_MMU_PAGES pages available."""
    from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES

    low = kvm.model_split_env.min_available_after_split
    if low is not None and low < KVM_MIN_FREE_MMU_PAGES:
        fail(
            "split_keeps_min_free_pages",
            f"a split left {low} pages available (KVM_MIN_FREE_MMU_PAGES={KVM_MIN_FREE_MMU_PAGES})",
        )


@invariant(
    kernel="kvm_account_mmu_page(), kvm_unaccount_mmu_page(), tdp_account_mmu_page()",
    mutant="mutants/split_sp_not_accounted",
)
def mmu_pages_accounted(kvm: Kvm) -> None:
    """n_used_mmu_pages counts shadow pages not yet zapped (and zapped roots still referenced); tdp_mmu_pages counts linked TDP tables."""
    shadow = [sp for sp in live_pages(kvm) if not sp.tdp_mmu_page]
    used = len(kvm.active_mmu_pages) + sum(1 for sp in shadow if sp.role.invalid and sp.root_count)
    if used != kvm.n_used_mmu_pages:
        fail("mmu_pages_accounted", f"n_used_mmu_pages={kvm.n_used_mmu_pages}, {used} accounted pages")
    tdp = sum(1 for sp in live_pages(kvm) if sp.tdp_mmu_page and sp not in kvm.tdp_mmu_roots)
    if tdp != kvm.tdp_mmu_pages:
        fail("mmu_pages_accounted", f"tdp_mmu_pages={kvm.tdp_mmu_pages}, {tdp} linked TDP tables")


@invariant(kernel="kvm_update_page_stats()", mutant="mutants/unmap_keeps_page_stats")
def page_stats_count_present_leaves(kvm: Kvm) -> None:
    """pages_4k, pages_2m and pages_1g equal the present leaf SPTEs at each level, over both MMUs."""
    count = [0, 0, 0]
    for sp, _, _ in present_leaves(kvm):
        if sp.role.level <= 3:
            count[sp.role.level - 1] += 1
    if count != kvm.stat.pages:
        fail("page_stats_count_present_leaves", f"stats pages={kvm.stat.pages}, present leaves {count}")


@invariant(kernel="kvm_zap_obsolete_pages(), kvm_mmu_commit_zap_page()", mutant="mutants/commit_zap_leaks_page")
def live_pages_are_reachable(kvm: Kvm) -> None:
    """Every live page table is a root, on the active list, or linked from a parent."""
    linked: set[int] = set()
    for sp in live_pages(kvm):
        level = sp.role.level
        for _, spte in sptes(sp):
            if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                linked.add(spte_to_pfn(spte))
    for sp in live_pages(kvm):
        if sp.root_count or sp in kvm.active_mmu_pages or sp.pfn in linked or sp in kvm.tdp_mmu_roots:
            continue
        fail("live_pages_are_reachable", f"{sp!r} is neither a root, active nor linked")


# --- TLBs ------------------------------------------------------------------------------------


_SPAN = (0, 1, 512, 512 * 512, 512 * 512 * 512, 512**4)
_BASE_MASK = 0x000F_FFFF_FFFF_F000


def _leaf_allowed(
    kvm: Kvm, sp: KvmMmuPage, i: int, spte: int, want_pfn: int, access: int, dirty: bool, strict: bool
) -> str | None:
    m = kvm.masks
    base = (spte & _BASE_MASK) >> PAGE_SHIFT
    if base != want_pfn:
        return f"{sp!r}[{i}] maps pfn {base:#x}, the TLB caches {want_pfn:#x}"
    missing = access & ~spte_access(m, spte)
    if missing == ACC_WRITE_MASK and not strict and _dirty_log_write_protect(kvm, sp, i, spte):
        missing = 0  # flushed before returning to userspace
    if missing:
        return f"{sp!r}[{i}] = {spte:#x} no longer grants {missing:#x} that the TLB caches"
    if strict and dirty and m.shadow_dirty_mask and spte_ad_enabled(spte) and not spte & m.shadow_dirty_mask:
        # D only matters where PML logs by D bits; elsewhere KVM hands a
        # dropped D to the page (kvm_set_pfn_dirty()) without a flush.
        if kvm.config.cpu_dirty_log_size:
            slot = kvm.gfn_to_memslot(kvm_mmu_page_get_gfn(sp, i))
            if slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                return f"{sp!r}[{i}] = {spte:#x} is clean in a PML-logged slot but the TLB caches it dirty"
    return None


def _dirty_log_write_protect(kvm: Kvm, sp: KvmMmuPage, i: int, spte: int) -> bool:
    """May this W clear wait for the flush before the ioctl returns?

    Dirty logging clears W (keeping MMU-writable) and, for huge pages in an
    initially-set KVM_CLEAR_DIRTY_LOG, write-protects them outright; both
    flush after dropping mmu_lock.  Any other write-protect must flush first,
    which flush_debt_paid_at_unlock checks.
    """
    if is_mmu_writable_spte(kvm.masks, spte):
        return True
    slot = kvm.gfn_to_memslot(kvm_mmu_page_get_gfn(sp, i))
    return slot is not None and bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)


def _region_allowed(
    kvm: Kvm, sp: KvmMmuPage, page: int, npages: int, pfn: int, access: int, dirty: bool, strict: bool
) -> str | None:
    """Is every page of the cached region [page, +npages) mapped by @sp's subtree as cached?"""
    level = sp.role.level
    span = _SPAN[level]
    while True:
        i = (page // span) & 511
        spte = sp.spt[i]
        if not spte & SPTE_MMU_PRESENT:
            return f"page {page << PAGE_SHIFT:#x} is cached but its SPTE in {sp!r}[{i}] is not present"
        if level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK:
            if npages >= span:
                # The cached region covers whole entries of this table.
                for k in range(npages // span):
                    e = sp.spt[i + k]
                    if not e & SPTE_MMU_PRESENT:
                        return f"page {(page + k * span) << PAGE_SHIFT:#x} is cached but {sp!r}[{i + k}] is not present"
                    if not (level == PG_LEVEL_4K or e & PT_PAGE_SIZE_MASK):
                        child = kvm.sp_by_pfn.get((e & _BASE_MASK) >> PAGE_SHIFT)
                        if child is None:
                            return f"{sp!r}[{i + k}] points at a freed table"
                        err = _region_allowed(kvm, child, page + k * span, span, pfn + k * span, access, dirty, strict)
                        if err:
                            return err
                        continue
                    err = _leaf_allowed(kvm, sp, i + k, e, pfn + k * span, access, dirty, strict)
                    if err:
                        return err
                return None
            # A bigger leaf maps the cached region: compare at the offset.
            return _leaf_allowed(kvm, sp, i, spte, pfn - (page & (span - 1)), access, dirty, strict)
        child = kvm.sp_by_pfn.get((spte & _BASE_MASK) >> PAGE_SHIFT)
        if child is None:
            return f"{sp!r}[{i}] points at a freed table"
        if npages > _SPAN[level - 1]:
            # The cached leaf was bigger than this table's entries: a split.
            sub = _SPAN[level - 1]
            for k in range(npages // sub):
                err = _region_allowed(kvm, child, page + k * sub, sub, pfn + k * sub, access, dirty, strict)
                if err:
                    return err
            return None
        sp = child
        level -= 1
        span = _SPAN[level]


def _walk_allowed(kvm: Kvm, root: KvmMmuPage, level: int, addr: int, child_pfn: int) -> str | None:
    """Does the SPTE at @level for @addr still point at table @child_pfn, as the cache says?"""
    sp = root
    lvl = root.role.level
    while True:
        i = (addr >> (PAGE_SHIFT + 9 * (lvl - 1))) & 511
        spte = sp.spt[i]
        if not spte & SPTE_MMU_PRESENT or (lvl == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK):
            return f"the walk cache holds a level-{level} entry for {addr:#x}, but {sp!r}[{i}] is no table now"
        pfn = (spte & _BASE_MASK) >> PAGE_SHIFT
        if lvl == level:
            if pfn != child_pfn:
                return f"the walk cache points the level-{level} entry for {addr:#x} at table {child_pfn:#x}, the SPTE at {pfn:#x}"
            return None
        child = kvm.sp_by_pfn.get(pfn)
        if child is None:
            return f"{sp!r}[{i}] points at a freed table"
        sp = child
        lvl -= 1


def tlb_translations_allowed(kvm: Kvm, strict: bool) -> None:
    for vcpu in kvm.vcpus:
        for ctx in (vcpu.root_mmu, vcpu.guest_mmu):
            root = ctx.root
            # An obsolete root is reloaded, with a TLB flush, before the vCPU runs again.
            if root is None or is_obsolete_sp(kvm, root):
                continue
            for (name, level, frame), entry in vcpu.tlb.leaves.items():
                if name != ctx.name:
                    continue
                addr = frame << (PAGE_SHIFT + KVM_HPAGE_GFN_SHIFT(level))
                err = _region_allowed(
                    kvm,
                    root,
                    addr >> PAGE_SHIFT,
                    KVM_PAGES_PER_HPAGE(level),
                    entry.pfn,
                    entry.access,
                    entry.dirty,
                    strict,
                )
                if err:
                    fail(
                        "tlb_translations_allowed_strict" if strict else "tlb_translations_allowed_at_unlock",
                        f"vcpu {vcpu.vcpu_id} {ctx.name} caches a level-{level} translation at {addr:#x}: {err}",
                    )
            # Paging-structure caches: a cached non-leaf entry must still point
            # at the same table, or the CPU could walk a freed one.
            for (name, level, prefix), child_pfn in vcpu.tlb.walks.items():
                if name != ctx.name:
                    continue
                addr = prefix << (PAGE_SHIFT + KVM_HPAGE_GFN_SHIFT(level))
                err = _walk_allowed(kvm, root, level, addr, child_pfn)
                if err:
                    fail(
                        "tlb_translations_allowed_strict" if strict else "tlb_translations_allowed_at_unlock",
                        f"vcpu {vcpu.vcpu_id} {ctx.name}: {err}",
                    )


@invariant(
    kernel="kvm_flush_remote_tlbs() before returning to userspace",
    mutant="mutants/get_dirty_log_no_flush",
    kind="return",
)
def tlb_translations_allowed_strict(kvm: Kvm) -> None:
    """When an ioctl returns, every translation a vCPU TLB caches is allowed by the SPTEs, dirty bits included."""
    tlb_translations_allowed(kvm, strict=True)


@invariant(
    kernel="flush before dropping mmu_lock (spte.h, kvm_mmu_commit_zap_page())",
    mutant="mutants/split_no_flush_on_nonleaf_reuse",
    kind="unlock",
)
def tlb_translations_allowed_at_unlock(kvm: Kvm) -> None:
    """Whenever mmu_lock is dropped, every cached translation is allowed by the SPTEs (dirty-logging W clears excepted)."""
    tlb_translations_allowed(kvm, strict=False)


@invariant(
    kernel="kvm_flush_remote_tlbs() before releasing mmu_lock", mutant="mutants/notifier_no_flush", kind="unlock"
)
def flush_debt_paid_at_unlock(kvm: Kvm) -> None:
    """No zap, unlink or MMU-writable clear is left unflushed when mmu_lock is dropped."""
    if kvm.tlb_flush_debt:
        fail(
            "flush_debt_paid_at_unlock",
            f"{kvm.tlb_flush_debt_count} unflushed changes, first by {kvm.tlb_flush_debt[0]}()",
        )


@invariant(
    kernel="kvm_flush_remote_tlbs_memslot() before the ioctl returns",
    mutant="mutants/get_dirty_log_no_flush",
    kind="return",
)
def flush_debt_paid_at_return(kvm: Kvm) -> None:
    """No change that needs a TLB flush, dirty-logging ones included, is left unflushed when an ioctl returns."""
    debt = kvm.tlb_flush_debt + kvm.tlb_flush_debt_deferred
    if debt:
        n = kvm.tlb_flush_debt_count + kvm.tlb_flush_debt_deferred_count
        fail("flush_debt_paid_at_return", f"{n} unflushed changes, first by {debt[0]}()")


# --- transitions ----------------------------------------------------------------------


def _permissions(kvm: Kvm, spte: int) -> tuple[bool, bool, bool]:
    m = kvm.masks
    return bool(spte & PT_WRITABLE_MASK), bool(spte & m.shadow_user_mask), bool(is_executable_pte(m, spte))


def _leaves_below(kvm: Kvm, sp: KvmMmuPage) -> Iterator[tuple[KvmMmuPage, int, int]]:
    """(table, index, spte) of every present leaf in the tables below @sp, @sp included."""
    for i, spte in sptes(sp):
        if not is_shadow_present_pte(spte):
            continue
        if is_last_spte(spte, sp.role.level):
            yield sp, i, spte
            continue
        child = kvm.sp_by_pfn.get(spte_to_pfn(spte))
        if child is not None:
            yield from _leaves_below(kvm, child)


@invariant(
    kernel="shadow_mmu_split_huge_page(), tdp_mmu_split_huge_page(), make_huge_page_split_spte()",
    mutant="mutants/split_pfn_offset_wrong_level",
    kind="split",
)
def split_keeps_gfn_to_pfn_mapping(kvm: Kvm, rec) -> None:  # type: ignore[no-untyped-def]
    """A split maps every gfn of the huge page to the same pfn with the same permissions (4K exec under NX, a flushed partial unmap excepted)."""
    name = "split_keeps_gfn_to_pfn_mapping"
    child = rec.child
    if child is None or child.role.level != rec.level - 1:
        fail(name, f"split of {rec.huge_sptep!r} left {child!r} linked, not a level-{rec.level - 1} table")
        return
    huge_pfn = spte_to_pfn(rec.huge_spte)
    span = KVM_PAGES_PER_HPAGE(child.role.level)
    huge_perms = _permissions(kvm, rec.huge_spte)
    # make_huge_page_split_spte(): a 4K child may execute again, since the
    # NX huge page mitigation no longer applies to it.
    exec_at_4k = child.role.level == PG_LEVEL_4K and kvm.is_nx_huge_page_enabled() and child.role.access & 4
    for i in range(SPTE_ENT_PER_PAGE):
        spte = child.spt[i]
        gfn = rec.gfn + i * span
        if child.role.direct and kvm_mmu_page_get_gfn(child, i) != gfn:
            fail(name, f"{child!r}[{i}] maps gfn {kvm_mmu_page_get_gfn(child, i):#x}, the huge page had {gfn:#x} there")
        if not is_shadow_present_pte(spte):
            if not rec.flushed:
                fail(name, f"split of gfn {rec.gfn:#x} left gfn {gfn:#x} unmapped without a TLB flush")
            continue
        if not is_last_spte(spte, child.role.level):
            # A reused page's entry points at a table that may be partly
            # filled: the split unmaps what it lacks and must flush.
            if not rec.flushed:
                fail(name, f"split reused {child!r} whose entry {i} is a non-leaf, without a TLB flush")
            for sp, j, leaf in _leaves_below(kvm, kvm.sp_by_pfn[spte_to_pfn(spte)]):
                g = kvm_mmu_page_get_gfn(sp, j)
                if spte_to_pfn(leaf) != huge_pfn + (g - rec.gfn):
                    fail(name, f"{sp!r}[{j}] under reused entry {i} maps gfn {g:#x} to pfn {spte_to_pfn(leaf):#x}")
            continue
        want_pfn = huge_pfn + i * span
        if spte_to_pfn(spte) != want_pfn:
            fail(
                name,
                f"{child!r}[{i}] maps gfn {gfn:#x} to pfn {spte_to_pfn(spte):#x}; the huge page mapped it to {want_pfn:#x}",
            )
        if rec.reused:
            # Entries already present keep their own permissions (another
            # alias of the same translation installed them).
            continue
        perms = _permissions(kvm, spte)
        if perms != huge_perms and not (exec_at_4k and perms[:2] == huge_perms[:2] and perms[2]):
            fail(
                name,
                f"{child!r}[{i}] has (W, U, X) = {perms}; the huge page had {huge_perms}",
            )


@invariant(
    kernel="kvm_update_page_stats() in shadow_mmu_split_huge_page() and tdp_mmu_split_huge_page()",
    mutant="mutants/split_stats_reused_as_fresh",
    kind="split",
)
def split_moves_page_stats_to_its_children(kvm: Kvm, rec) -> None:  # type: ignore[no-untyped-def]
    """A split takes its huge leaf off the page stats and adds one leaf per entry it filled below (512, or the empty entries of a reused page).

    The lookup of the split page may zap unsync 4K pages at its gfn; their
    leaves leave the 4K stat in the same step.
    """
    k = rec.nonpresent_before if rec.reused else SPTE_ENT_PER_PAGE
    want = list(rec.stats)
    want[rec.level - 1] -= 1
    want[rec.level - 2] += k
    # kvm_mmu_find_shadow_page() zaps unsync 4K pages at the split page's gfn.
    want[0] -= sum(n for sp, n in rec.unsync_at_gfn if sp.role.invalid or sp not in kvm.active_mmu_pages)
    if list(kvm.stat.pages) != want:
        fail(
            "split_moves_page_stats_to_its_children",
            f"split of a level-{rec.level} leaf at gfn {rec.gfn:#x} took pages {list(rec.stats)} to "
            f"{list(kvm.stat.pages)}; {want} expected ({k} entries filled" + (", reused page)" if rec.reused else ")"),
        )


@invariant(
    kernel="tdp_mmu_init_child_sp(), shadow_mmu_get_sp_for_split() (NX huge page recovery)",
    mutant="mutants/split_page_tracked_for_nx_recovery",
    kind="split",
)
def split_page_is_not_an_nx_recovery_candidate(kvm: Kvm, rec) -> None:  # type: ignore[no-untyped-def]
    """A page a split creates is not nx_huge_page_disallowed and not on possible_nx_huge_pages."""
    child = rec.child
    if child is None or rec.reused:
        return  # a reused page keeps what the fault that made it decided
    if child.nx_huge_page_disallowed or child.possible_nx_huge_page or child in kvm.possible_nx_huge_pages:
        fail(
            "split_page_is_not_an_nx_recovery_candidate",
            f"split made {child!r}, which the NX recovery worker would zap: nx_huge_page_disallowed="
            f"{child.nx_huge_page_disallowed}, on possible_nx_huge_pages={child in kvm.possible_nx_huge_pages}",
        )


@invariant(
    kernel="kvm_shadow_mmu_try_split_huge_pages(), tdp_mmu_split_huge_pages_root()",
    mutant="mutants/split_levels_ascending",
    kind="split_pass",
)
def split_pass_goes_top_down_to_the_target(kvm: Kvm, p) -> None:  # type: ignore[no-untyped-def]
    """A split pass splits 1G before 2M in the shadow MMU and, absent -ENOSPC and -ENOMEM, leaves no huge leaf above its target in range."""
    name = "split_pass_goes_top_down_to_the_target"
    levels = [r.level for r in p.splits if r.mmu == "shadow"]
    for a, b in pairwise(levels):
        if a < b:
            fail(name, f"the shadow MMU split a level-{b} page after a level-{a} one in the same pass")
    if p.errors or not kvm.tdp_mmu_enabled:
        # The caller write-protects what could not be split; without the
        # TDP MMU, kvm_mmu_*try_split_huge_pages() return before splitting.
        return
    slot = p.slot
    if kvm.kvm_memslots_have_rmaps():
        for level in range(p.target_level + 1, KVM_MAX_HUGEPAGE_LEVEL + 1):
            shift = KVM_HPAGE_GFN_SHIFT(level)
            for index, head in slot.rmap[level - 1].items():
                first = (index + (slot.base_gfn >> shift)) << shift
                if first >= p.end or first + KVM_PAGES_PER_HPAGE(level) <= p.start:
                    continue
                for sptep in rmap_iter(head):
                    if not sptep.sp.role.invalid and is_shadow_present_pte(sptep.spte):
                        fail(name, f"{sptep!r} still maps gfn {first:#x} at level {level} after the pass")
    if kvm.tdp_mmu_enabled:
        for root in kvm.tdp_mmu_roots:
            if root.role.invalid:
                continue
            for it in for_each_tdp_pte_min_level(kvm, root, p.target_level + 1, p.start, p.end):
                if (
                    it.level > p.target_level
                    and is_shadow_present_pte(it.old_spte)
                    and is_last_spte(it.old_spte, it.level)
                ):
                    fail(name, f"TDP MMU level-{it.level} leaf at gfn {it.gfn:#x} survived the pass")
