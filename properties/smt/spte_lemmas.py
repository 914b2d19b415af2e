"""SPTE lemmas: make_huge_page_split_spte(), the writable triad, access tracking, MMIO, indexes.

Each query runs the model's own helper (kvmsplit/spte.py, kvmsplit/mmu.py,
kvmsplit/memslot.py, kvmsplit/mmu_page.py, or the split policy's
make_huge_page_split_spte() method) on 64-bit Z3 bit-vectors, for both mask
sets (EPT and non-EPT) wherever the helper depends on them.
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

from kvmsplit.properties.smt import sym
from kvmsplit.properties.smt.engine import Claim, Impl, Query, Var
from kvmsplit.properties.smt.spec import (
    SAVED_X,
    child_pfn,
    exec_mask,
    huge_spte_ok,
    leaf_spte_well_formed,
    masks_of,
    model_kvm,
    split_child_sp,
)

from kvmsplit.kvm import Kvm, KvmConfig
from kvmsplit.memslot import KvmMemorySlot, gfn_round_for_level, gfn_to_index
from kvmsplit.mmu_page import KvmMmuPage, kvm_mmu_page_get_gfn
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    MMIO_SPTE_GEN_MASK,
    MODEL_HOST_PHYS_BITS,
    MODEL_MAX_PFN,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    U64_MASK,
    SpteMasks,
    _not,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_access_track_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    spte_ad_enabled,
    spte_to_pfn,
    spte_writable_triad_holds,
)

HUGE_LEVELS = (PG_LEVEL_2M, PG_LEVEL_1G)
MASKS = (1, 0)  # ept=1: EPT_MASKS, ept=0: NON_EPT_MASKS

# A guest physical address has at most 52 bits.
GPA_GFN_LIMIT = 1 << (52 - PAGE_SHIFT)


def cases(**axes: tuple[int, ...]) -> tuple[dict[str, int], ...]:
    names = list(axes)
    return tuple(dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values()))


# --- make_huge_page_split_spte() ----------------------------------------------------


def _split_child(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> tuple[SpteMasks, int, Any, list[Any]]:
    """The child the policy builds for entry @index of a present huge SPTE, and the preconditions."""
    m = masks_of(case)
    level = case["level"]
    kvm = model_kvm(bool(case["ept"]), bool(case["nx_huge_pages"]))
    sp = split_child_sp(level - 1, case["access"], tdp_mmu_page=bool(case["tdp_mmu_page"]))
    huge_spte, index = v["huge_spte"], v["index"]
    child = impl.policy.make_huge_page_split_spte(kvm, huge_spte, sp, index)
    return m, level - 1, child, [*huge_spte_ok(m, huge_spte, level), sym.ult(index, SPTE_ENT_PER_PAGE)]


SPLIT_VARS = (Var(name="huge_spte"), Var(name="index"))
# Both MMUs build children with make_huge_page_split_spte(): the shadow MMU
# into a nested (guest_mode) page, the TDP MMU into a TDP MMU page.
SPLIT_CASES = cases(
    ept=MASKS, tdp_mmu_page=(0, 1), level=HUGE_LEVELS, access=tuple(range(ACC_ALL + 1)), nx_huge_pages=(0, 1)
)


def split_child_maps_huge_pfn_plus_offset(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    _m, child_level, child, assumptions = _split_child(impl, v, case)
    want = child_pfn(v["huge_spte"], child_level, v["index"])
    return Claim(
        assumptions=assumptions,
        goal=spte_to_pfn(child) == want,
        shown={"child_spte": child, "child_pfn": spte_to_pfn(child), "expected_pfn": want},
    )


def split_child_ps_matches_level(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    _m, child_level, child, assumptions = _split_child(impl, v, case)
    ps = (child & PT_PAGE_SIZE_MASK) != 0
    return Claim(
        assumptions=assumptions,
        goal=ps if child_level > PG_LEVEL_4K else _not(ps),
        shown={"child_spte": child},
    )


def split_child_copies_other_bits(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m, _child_level, child, assumptions = _split_child(impl, v, case)
    huge_spte = v["huge_spte"]
    copied = U64_MASK & ~(SPTE_BASE_ADDR_MASK | PT_PAGE_SIZE_MASK | exec_mask(m))
    return Claim(
        assumptions=assumptions,
        goal=sym.conj(
            (child & copied) == (huge_spte & copied),
            sym.iff(is_access_track_spte(m, child), is_access_track_spte(m, huge_spte)),
        ),
        shown={"child_spte": child},
    )


def split_child_exec_follows_nx_rule(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m, child_level, child, assumptions = _split_child(impl, v, case)
    huge_spte = v["huge_spte"]
    restores_exec = child_level == PG_LEVEL_4K and (case["access"] & ACC_EXEC_MASK) and case["nx_huge_pages"]
    if restores_exec:
        # Executable once access tracking is undone: X set and NX clear, or
        # the saved X bit set while the SPTE is access-tracked.
        executable = (child & (m.shadow_x_mask | m.shadow_nx_mask)) == m.shadow_x_mask
        goal = sym.conj(
            sym.implies(_not(is_access_track_spte(m, child)), executable),
            sym.implies(is_access_track_spte(m, child), (child & SAVED_X) != 0),
        )
    else:
        goal = (child & exec_mask(m)) == (huge_spte & exec_mask(m))
    return Claim(assumptions=assumptions, goal=goal, shown={"child_spte": child})


def split_keeps_writable_triad(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m, _child_level, child, assumptions = _split_child(impl, v, case)
    return Claim(
        assumptions=[*assumptions, spte_writable_triad_holds(m, v["huge_spte"])],
        goal=spte_writable_triad_holds(m, child),
        shown={"child_spte": child},
    )


# --- make_spte() ----------------------------------------------------------------------


@cache
def _make_spte_kvm(ept: bool) -> Kvm:
    """Model: a VM with a shadow root, so write tracking counts (kvm_gfn_is_write_tracked())."""
    kvm = Kvm.create(KvmConfig.named("tdp" if ept else "shadow"))
    kvm.nx_huge_pages = True
    kvm.shadow_root_allocated = True
    return kvm


def _make_spte_slot(write_tracked: bool) -> KvmMemorySlot:
    slot = KvmMemorySlot(id=0, base_gfn=0, npages=1, userspace_addr=0)
    if write_tracked:
        slot.gfn_write_track[0] = 1
    return slot


MAKE_SPTE_CASES = tuple(
    c
    for c in cases(
        ept=MASKS,
        level=(PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G),
        pte_access=tuple(range(ACC_ALL + 1)),
        host_writable=(0, 1),
        prefetch=(0, 1),
        write_tracked=(0, 1),
        ad_disabled=(0, 1),
    )
    if c["ept"] or not c["ad_disabled"]
)


def make_spte_builds_well_formed_triad(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    kvm = _make_spte_kvm(bool(case["ept"]))
    sp = KvmMmuPage(
        role=KvmMmuPageRole(level=case["level"], direct=True, ad_disabled=bool(case["ad_disabled"])), gfn=0, pfn=0
    )
    slot = _make_spte_slot(bool(case["write_tracked"]))
    _, spte = impl.fn("make_spte")(
        kvm, sp, slot, case["pte_access"], 0, v["pfn"], 0, bool(case["prefetch"]), False, bool(case["host_writable"])
    )
    host_w = (spte & m.shadow_host_writable_mask) != 0
    return Claim(
        assumptions=[sym.ult(v["pfn"], MODEL_MAX_PFN)],
        goal=sym.conj(
            spte_writable_triad_holds(m, spte),
            leaf_spte_well_formed(m, spte),
            sym.iff(host_w, bool(case["host_writable"])),
            spte_to_pfn(spte) == v["pfn"],
        ),
        shown={"spte": spte},
    )


# --- access tracking and write protection ------------------------------------------------


def _leaf(m: SpteMasks, s: Any) -> list[Any]:
    return [is_shadow_present_pte(s), leaf_spte_well_formed(m, s)]


def access_tracking_keeps_writable_triad(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    s = v["spte"]
    marked = impl.fn("mark_spte_for_access_track")(m, s)
    restored = impl.fn("restore_acc_track_spte")(m, s)
    return Claim(
        assumptions=[*_leaf(m, s), spte_writable_triad_holds(m, s)],
        goal=sym.conj(
            spte_writable_triad_holds(m, marked),
            sym.implies(is_access_track_spte(m, s), spte_writable_triad_holds(m, restored)),
        ),
        shown={"marked_spte": marked, "restored_spte": restored},
    )


def write_protect_keeps_writable_triad(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    s = v["spte"]
    protected = impl.fn("spte_write_protect")(m, s, bool(case["pt_protect"]))
    goal = sym.conj(spte_writable_triad_holds(m, protected), (protected & PT_WRITABLE_MASK) == 0)
    if case["pt_protect"]:
        goal = sym.conj(goal, (protected & m.shadow_mmu_writable_mask) == 0)
    return Claim(
        assumptions=[*_leaf(m, s), spte_writable_triad_holds(m, s)],
        goal=goal,
        shown={"protected_spte": protected},
    )


def access_tracking_round_trips(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    s = v["spte"]
    mark = impl.fn("mark_spte_for_access_track")
    restore = impl.fn("restore_acc_track_spte")
    marked = mark(m, s)
    restored = restore(m, marked)
    ad = spte_ad_enabled(s)
    goal = sym.conj(
        # With A/D bits, access tracking is just clearing A.
        sym.implies(ad, marked == (s & ~m.shadow_accessed_mask)),
        # Without them the SPTE loses R, W and X until restored, and only W
        # stays lost (a write fault regains it through MMU-writable).
        sym.implies(
            _not(ad),
            sym.conj(is_access_track_spte(m, marked), restored == (s & ~PT_WRITABLE_MASK), mark(m, marked) == marked),
        ),
    )
    return Claim(
        # The triad too: mark_spte_for_access_track() WARNs without it.
        assumptions=[*_leaf(m, s), spte_writable_triad_holds(m, s), _not(is_access_track_spte(m, s))],
        goal=goal,
        shown={"marked_spte": marked, "restored_spte": restored},
    )


# --- MMIO, REMOVED_SPTE and non-leaf SPTEs ----------------------------------------------------


def mmio_spte_is_never_shadow_present(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    gen, gfn = v["generation"], v["gfn"]
    s = impl.fn("make_mmio_spte")(m, gen, gfn, case["access"])
    removed = impl.fn("REMOVED_SPTE")()
    return Claim(
        assumptions=[sym.ult(gen, MMIO_SPTE_GEN_MASK + 1), sym.ult(gfn, 1 << (MODEL_HOST_PHYS_BITS - PAGE_SHIFT))],
        goal=sym.conj(
            _not(is_shadow_present_pte(s)),
            is_mmio_spte(m, s),
            s != removed,
            get_mmio_spte_generation(s) == gen,
            get_mmio_spte_gfn(s) == gfn,
        ),
        shown={"mmio_spte": s},
    )


def removed_spte_is_neither_present_nor_mmio(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    s = v["spte"]
    return Claim(
        assumptions=[s == impl.fn("REMOVED_SPTE")()],
        goal=sym.conj(_not(is_shadow_present_pte(s)), _not(is_mmio_spte(m, s))),
    )


def nonleaf_spte_is_present_not_huge_all_access(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    m = masks_of(case)
    child_pfn_ = v["child_pfn"]
    s = impl.fn("make_nonleaf_spte")(m, child_pfn_, bool(case["ad_disabled"]))
    return Claim(
        assumptions=[sym.ult(child_pfn_, MODEL_MAX_PFN)],
        goal=sym.conj(
            is_shadow_present_pte(s),
            (s & PT_PAGE_SIZE_MASK) == 0,
            (s & m.shadow_present_mask) == m.shadow_present_mask,
            (s & PT_WRITABLE_MASK) != 0,
            (s & m.shadow_user_mask) == m.shadow_user_mask,
            (s & (m.shadow_x_mask | m.shadow_nx_mask)) == m.shadow_x_mask,
            spte_to_pfn(s) == child_pfn_,
        ),
        shown={"nonleaf_spte": s},
    )


# --- index arithmetic -----------------------------------------------------------------------


def index_helpers_agree(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    level = case["level"]
    gfn = v["gfn"]
    # A direct page of @level covering @gfn starts at gfn rounded to the level above.
    sp = KvmMmuPage(role=KvmMmuPageRole(level=level, direct=True), gfn=gfn_round_for_level(gfn, level + 1), pfn=0)
    index = impl.fn("SPTE_INDEX")(gfn << PAGE_SHIFT, level)
    return Claim(
        assumptions=[sym.ult(gfn, GPA_GFN_LIMIT)],
        goal=sym.conj(
            sym.ult(index, SPTE_ENT_PER_PAGE),
            kvm_mmu_page_get_gfn(sp, index) == gfn_round_for_level(gfn, level),
            gfn_to_index(gfn, sp.gfn, level) == index,
            (gfn_to_index(gfn, 0, level) & (SPTE_ENT_PER_PAGE - 1)) == index,
        ),
        shown={"index": index, "sp_gfn": sp.gfn},
    )


BOTH = "both mask sets"
SPLIT_SCOPE = (
    "all 64-bit huge SPTEs and indexes 0..511, levels 2M and 1G, every child access, NX mitigation on and off, "
    f"shadow and TDP MMU child pages, {BOTH}"
)

QUERIES = (
    Query(
        name="split_child_maps_huge_pfn_plus_offset",
        proves="make_huge_page_split_spte() maps child @index to huge_pfn + index * KVM_PAGES_PER_HPAGE(child level)",
        scope=SPLIT_SCOPE,
        mutant="mutants/split_pfn_offset_wrong_level",
        variables=SPLIT_VARS,
        claim=split_child_maps_huge_pfn_plus_offset,
        cases=SPLIT_CASES,
        enumerate_on_branch=("index", SPTE_ENT_PER_PAGE),
    ),
    Query(
        name="split_child_ps_matches_level",
        proves="make_huge_page_split_spte() clears PS in 4K children and keeps it in 2M children",
        scope=SPLIT_SCOPE,
        mutant="mutants/split_keeps_ps_at_4k",
        variables=SPLIT_VARS,
        claim=split_child_ps_matches_level,
        cases=SPLIT_CASES,
    ),
    Query(
        name="split_child_copies_other_bits",
        proves="a split child copies every bit but the pfn, PS and exec (W, MMU-/Host-writable, U, A, D, memtype, A/D type, tracking)",
        scope=SPLIT_SCOPE,
        mutant="twin/split_drops_accessed",
        variables=SPLIT_VARS,
        claim=split_child_copies_other_bits,
        cases=SPLIT_CASES,
    ),
    Query(
        name="split_child_exec_follows_nx_rule",
        proves="a 4K child regains exec under the NX huge page mitigation; otherwise the exec state is copied",
        scope=SPLIT_SCOPE,
        mutant="mutants/split_exec_at_2m",
        variables=SPLIT_VARS,
        claim=split_child_exec_follows_nx_rule,
        cases=SPLIT_CASES,
    ),
    Query(
        name="split_keeps_writable_triad",
        proves="a split child of a huge SPTE with a valid W/MMU-writable/Host-writable triad has a valid triad",
        scope=SPLIT_SCOPE,
        mutant="twin/split_drops_host_writable",
        variables=SPLIT_VARS,
        claim=split_keeps_writable_triad,
        cases=SPLIT_CASES,
    ),
    Query(
        name="make_spte_builds_well_formed_triad",
        proves="make_spte() builds a well-formed leaf with a valid writable triad, Host-writable as asked, the given pfn",
        scope="all pfns below the model's 46-bit host limit; every level, ACC_* access, host_writable, prefetch, "
        f"write-tracked gfn and A/D setting; {BOTH}",
        mutant="twin/make_spte_pfn_at_bit_10",
        variables=(Var(name="pfn"),),
        claim=make_spte_builds_well_formed_triad,
        cases=MAKE_SPTE_CASES,
    ),
    Query(
        name="access_tracking_keeps_writable_triad",
        proves="mark_spte_for_access_track() and restore_acc_track_spte() keep the writable triad",
        scope=f"all 64-bit well-formed shadow-present SPTEs, {BOTH}",
        mutant="twin/restore_grants_w",
        variables=(Var(name="spte"),),
        claim=access_tracking_keeps_writable_triad,
        cases=cases(ept=MASKS),
    ),
    Query(
        name="write_protect_keeps_writable_triad",
        proves="spte_write_protect() clears W (and MMU-writable for page tables) and keeps the writable triad",
        scope=f"all 64-bit well-formed shadow-present SPTEs, pt_protect true and false, {BOTH}",
        mutant="twin/write_protect_keeps_w",
        variables=(Var(name="spte"),),
        claim=write_protect_keeps_writable_triad,
        cases=cases(ept=MASKS, pt_protect=(0, 1)),
    ),
    Query(
        name="access_tracking_round_trips",
        proves="restore_acc_track_spte(mark_spte_for_access_track(spte)) gives back spte less W; with A/D only A clears",
        scope=f"all 64-bit well-formed shadow-present SPTEs not yet access-tracked, {BOTH}",
        mutant="twin/restore_keeps_saved_bits",
        variables=(Var(name="spte"),),
        claim=access_tracking_round_trips,
        cases=cases(ept=MASKS),
    ),
    Query(
        name="mmio_spte_is_never_shadow_present",
        proves="make_mmio_spte() is never shadow-present or REMOVED_SPTE, is_mmio_spte(), and round-trips gen and gfn",
        scope=f"all 19-bit generations, gfns below the 46-bit host limit, every access, {BOTH}",
        mutant="twin/mmio_gen_overlaps_mmu_present",
        variables=(Var(name="generation"), Var(name="gfn")),
        claim=mmio_spte_is_never_shadow_present,
        cases=cases(ept=MASKS, access=tuple(range(ACC_ALL + 1))),
    ),
    Query(
        name="removed_spte_is_neither_present_nor_mmio",
        proves="REMOVED_SPTE (FROZEN_SPTE) is never shadow-present and never an MMIO SPTE",
        scope=BOTH,
        mutant="twin/removed_spte_with_mmu_present",
        variables=(Var(name="spte"),),
        claim=removed_spte_is_neither_present_nor_mmio,
        cases=cases(ept=MASKS),
    ),
    Query(
        name="nonleaf_spte_is_present_not_huge_all_access",
        proves="make_nonleaf_spte() is shadow-present, never PS, grants R/W/U/X and points at the child pfn",
        scope=f"all child pfns below the model's 46-bit host limit, A/D on and off, {BOTH}",
        mutant="twin/nonleaf_without_user",
        variables=(Var(name="child_pfn"),),
        claim=nonleaf_spte_is_present_not_huge_all_access,
        cases=cases(ept=MASKS, ad_disabled=(0, 1)),
    ),
    Query(
        name="index_helpers_agree",
        proves="SPTE_INDEX(), gfn_round_for_level(), gfn_to_index() and kvm_mmu_page_get_gfn() agree on every gfn",
        scope="all gfns of a 52-bit guest physical address space, page tables of levels 4K, 2M and 1G",
        mutant="twin/spte_index_one_level_up",
        variables=(Var(name="gfn"),),
        claim=index_helpers_agree,
        cases=cases(level=(PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G)),
    ),
)
