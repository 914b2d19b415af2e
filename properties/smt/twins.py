"""Local broken twins of model functions, and the twin encodings the queries need.

A local twin is a helper or split policy with one deliberate bug, for a
query whose claim no mutant in models/mutants breaks (those mutants change
the split policy only).  Each exists so Z3 can show the query is able to
fail; tests/smt checks that it does.  Select one by name, e.g.
``run_query(..., model="twin/restore_grants_w")``.

Twin encodings: `kvm_mmu_available_pages()` and `spte_write_protect_value()`
restate, as pure functions, code the model keeps inside methods with side
effects (Kvm.kvm_mmu_available_pages(), shadow_mmu.spte_write_protect()).
They keep the kernel names and tests/smt/test_twins.py checks that they agree
with the model on values Hypothesis draws.
"""

from __future__ import annotations

from typing import Any

import z3
from kvmsplit.properties.smt import sym
from kvmsplit.properties.smt.engine import Impl

from kvmsplit import mmu, spte
from kvmsplit.split import MERGED, MergedSplit
from kvmsplit.spte import (
    MMIO_SPTE_GEN_HIGH_MASK,
    MMIO_SPTE_GEN_HIGH_SHIFT,
    PAGE_SHIFT,
    PT_WRITABLE_MASK,
    SPTE_LEVEL_BITS,
    SPTE_MMU_PRESENT_MASK,
    Spte,
    SpteMasks,
    _if,
    _is_int,
    _not,
    is_last_spte,
    is_shadow_present_pte,
)

# --- twin encodings ---------------------------------------------------------------


def kvm_mmu_available_pages(n_max_mmu_pages: Any, n_used_mmu_pages: Any) -> Any:
    """mmu.c kvm_mmu_available_pages() over explicit counts (Model: the Kvm method reads them from kvm)."""
    if sym.is_symbolic(n_max_mmu_pages, n_used_mmu_pages):
        return z3.If(n_max_mmu_pages > n_used_mmu_pages, n_max_mmu_pages - n_used_mmu_pages, 0)
    if n_max_mmu_pages > n_used_mmu_pages:
        return n_max_mmu_pages - n_used_mmu_pages
    return 0


def spte_write_protect_value(m: SpteMasks, spte: Spte, pt_protect: bool) -> Spte:
    """The value mmu.c spte_write_protect() stores (Model: shadow_mmu.spte_write_protect() also stores it).

    Clear MMU-writable first when protecting a shadowed page table, then W;
    the dirty-logging form (pt_protect false) clears only W, as
    spte_wrprot_for_clear_dirty() and the TDP MMU's wrprot_gfn_range() do.
    """
    if pt_protect:
        spte = spte & ~_const(spte, m.shadow_mmu_writable_mask)
    return spte & ~_const(spte, PT_WRITABLE_MASK)


def _const(like: Spte, value: int) -> Spte:
    return value if _is_int(like) else z3.BitVecVal(value, like.size())


# --- local broken twins ----------------------------------------------------------------


class SplitDropsAccessed(MergedSplit):
    """Build children without the A bit, as if a split counted as an access-tracking pass."""

    name = "twin/split_drops_accessed"

    def make_huge_page_split_spte(self, kvm: Any, huge_spte: Spte, sp: Any, index: Spte) -> Spte:
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        return child & ~_const(child, kvm.masks.shadow_accessed_mask)


class SplitDropsHostWritable(MergedSplit):
    """Build children without Host-writable, leaving W and MMU-writable set."""

    name = "twin/split_drops_host_writable"

    def make_huge_page_split_spte(self, kvm: Any, huge_spte: Spte, sp: Any, index: Spte) -> Spte:
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        return child & ~_const(child, kvm.masks.shadow_host_writable_mask)


class SplitOverwritesPresentLeaves(MergedSplit):
    """Rebuild present leaves of a reused child page instead of leaving them alone."""

    name = "twin/split_overwrites_present_leaves"

    def shadow_mmu_split_child(self, kvm: Any, huge_spte: Spte, sp: Any, index: Spte, child: Spte) -> tuple[Spte, Any]:
        keep = sym.conj(is_shadow_present_pte(child), _not(is_last_spte(child, sp.role.level)))
        flush = sym.conj(is_shadow_present_pte(child), self.reused_child_needs_flush(child, sp.role.level))
        return _if(keep, child, self.make_huge_page_split_spte(kvm, huge_spte, sp, index)), flush


def restore_grants_w(m: SpteMasks, s: Spte) -> Spte:
    """restore_acc_track_spte() that also sets W, which access tracking never saved."""
    return spte.restore_acc_track_spte(m, s) | PT_WRITABLE_MASK


def restore_keeps_saved_bits(m: SpteMasks, s: Spte) -> Spte:
    """restore_acc_track_spte() that forgets to clear the save area."""
    saved = sym_lshr(s, spte.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & spte.SHADOW_ACC_TRACK_SAVED_BITS_MASK
    return (s & ~_const(s, m.shadow_acc_track_mask)) | saved


def sym_lshr(x: Spte, n: int) -> Spte:
    return x >> n if _is_int(x) else z3.LShR(x, n)


def write_protect_keeps_w(m: SpteMasks, s: Spte, pt_protect: bool) -> Spte:
    """spte_write_protect() that clears MMU-writable for a shadowed page table but leaves W."""
    if pt_protect:
        return s & ~_const(s, m.shadow_mmu_writable_mask)
    return s & ~_const(s, PT_WRITABLE_MASK)


def make_mmio_spte_gen_overlaps_mmu_present(m: SpteMasks, generation: Spte, gfn: Spte, access: int) -> Spte:
    """make_mmio_spte() with the low generation bits one place too high, reaching bit 11."""
    low = (generation << (spte.MMIO_SPTE_GEN_LOW_SHIFT + 1)) & (spte.MMIO_SPTE_GEN_LOW_MASK << 1)
    high = (generation << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return low | high | m.shadow_mmio_value | (access & m.shadow_mmio_access_mask) | (gfn << PAGE_SHIFT)


def make_nonleaf_spte_without_user(m: SpteMasks, child_pfn: Spte, ad_disabled: bool) -> Spte:
    """make_nonleaf_spte() that leaves out shadow_user_mask, so user accesses fault below it."""
    s = spte.make_nonleaf_spte(m, child_pfn, ad_disabled)
    return s & ~_const(s, m.shadow_user_mask)


def make_spte_pfn_at_bit_10(*args: Any, **kwargs: Any) -> tuple[bool, Spte]:
    """make_spte() that places the pfn at bit 10 instead of PAGE_SHIFT, over the software bits."""
    names = ("kvm", "sp", "slot", "pte_access", "gfn", "pfn", "old_spte", "prefetch", "synchronizing", "host_writable")
    bound = dict(zip(names, args, strict=False)) | kwargs
    pfn = bound["pfn"]
    bound["pfn"] = 0
    wrprot, s = spte.make_spte(**bound)
    return wrprot, s | (pfn << 10)


def spte_index_one_level_up(addr: Spte, level: int) -> Spte:
    """SPTE_INDEX() shifting by the level's own page count instead of the next lower one's."""
    return sym_lshr(addr, PAGE_SHIFT + level * SPTE_LEVEL_BITS) & 511


REMOVED_SPTE_WITH_MMU_PRESENT = spte.REMOVED_SPTE | SPTE_MMU_PRESENT_MASK

TWINS: dict[str, Impl] = {
    t.model: t
    for t in (
        Impl(model=SplitDropsAccessed.name, policy=SplitDropsAccessed()),
        Impl(model=SplitDropsHostWritable.name, policy=SplitDropsHostWritable()),
        Impl(model=SplitOverwritesPresentLeaves.name, policy=SplitOverwritesPresentLeaves()),
        Impl(model="twin/restore_grants_w", policy=MERGED, overrides={"restore_acc_track_spte": restore_grants_w}),
        Impl(
            model="twin/restore_keeps_saved_bits",
            policy=MERGED,
            overrides={"restore_acc_track_spte": restore_keeps_saved_bits},
        ),
        Impl(
            model="twin/write_protect_keeps_w", policy=MERGED, overrides={"spte_write_protect": write_protect_keeps_w}
        ),
        Impl(
            model="twin/mmio_gen_overlaps_mmu_present",
            policy=MERGED,
            overrides={"make_mmio_spte": make_mmio_spte_gen_overlaps_mmu_present},
        ),
        Impl(
            model="twin/removed_spte_with_mmu_present",
            policy=MERGED,
            overrides={"REMOVED_SPTE": lambda: REMOVED_SPTE_WITH_MMU_PRESENT},
        ),
        Impl(
            model="twin/nonleaf_without_user",
            policy=MERGED,
            overrides={"make_nonleaf_spte": make_nonleaf_spte_without_user},
        ),
        Impl(model="twin/make_spte_pfn_at_bit_10", policy=MERGED, overrides={"make_spte": make_spte_pfn_at_bit_10}),
        Impl(model="twin/spte_index_one_level_up", policy=MERGED, overrides={"SPTE_INDEX": spte_index_one_level_up}),
    )
}

# The defaults the queries call when no twin overrides them.
DEFAULTS: dict[str, Any] = {
    "restore_acc_track_spte": spte.restore_acc_track_spte,
    "mark_spte_for_access_track": spte.mark_spte_for_access_track,
    "spte_write_protect": spte_write_protect_value,
    "make_mmio_spte": spte.make_mmio_spte,
    "REMOVED_SPTE": lambda: spte.REMOVED_SPTE,
    "make_nonleaf_spte": spte.make_nonleaf_spte,
    "make_spte": spte.make_spte,
    "SPTE_INDEX": mmu.SPTE_INDEX,
}
