"""The split loop over a whole symbolic 512-entry table, and the KVM_MIN_FREE_MMU_PAGES guard.

shadow_mmu_split_huge_page() may reuse a direct child page that already
holds entries, so its loop meets three kinds of entry: non-present (filled
with make_huge_page_split_spte()), a present leaf (left alone: the page is
direct, so it maps the same gfn to the same pfn) and a present non-leaf
(left alone, but its lower table may be partly filled, so the split must
flush).  The queries run the policy's per-entry step,
MergedSplit.shadow_mmu_split_child(), on 512 unconstrained 64-bit entries:
every entry is one of the three kinds by its own bits.

The guard query runs the policy's split_lacks_free_mmu_pages() on symbolic
page counts.
"""

from __future__ import annotations

from typing import Any

import z3
from kvmsplit.properties.smt import sym
from kvmsplit.properties.smt.engine import Claim, Impl, Query, Var
from kvmsplit.properties.smt.spec import (
    child_pfn,
    huge_spte_ok,
    is_present_leaf,
    is_present_nonleaf,
    masks_of,
    model_kvm,
    split_child_sp,
)
from kvmsplit.properties.smt.spte_lemmas import cases
from kvmsplit.properties.smt.twins import kvm_mmu_available_pages

from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES
from kvmsplit.spte import (
    ACC_ALL,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    spte_to_pfn,
)


def spt_name(index: int) -> str:
    return f"spt[{index}]"


TABLE_VARS = (Var(name="huge_spte"), *(Var(name=spt_name(i), omit_if_zero=True) for i in range(SPTE_ENT_PER_PAGE)))
# The NX mitigation on, so 4K children take the exec-restoring path too.
LOOP_CASES = cases(ept=(1, 0), level=(PG_LEVEL_2M, PG_LEVEL_1G), access=(ACC_ALL,), nx_huge_pages=(1,))


def _split_table(
    impl: Impl, v: dict[str, Any], case: dict[str, int]
) -> tuple[int, list[Any], list[Any], list[Any], list[Any]]:
    """Run the policy's loop body over every entry.

    Return the child level, the table before and after, each entry's flush
    request (the split flushes if any is set) and the huge SPTE's preconditions.
    """
    m = masks_of(case)
    level = case["level"]
    child_level = level - 1
    kvm = model_kvm(bool(case["ept"]), bool(case["nx_huge_pages"]))
    sp = split_child_sp(child_level, case["access"])
    huge_spte = v["huge_spte"]
    old = [v[spt_name(i)] for i in range(SPTE_ENT_PER_PAGE)]
    new = []
    flushes = []
    for index in range(SPTE_ENT_PER_PAGE):
        child_spte, flush = impl.policy.shadow_mmu_split_child(kvm, huge_spte, sp, index, old[index])
        new.append(child_spte)
        flushes.append(flush)
    return child_level, old, new, flushes, huge_spte_ok(m, huge_spte, level)


def split_flushes_iff_reused_nonleaf(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    child_level, old, _new, flushes, assumptions = _split_table(impl, v, case)
    flush = sym.disj(*flushes)
    any_nonleaf = sym.disj(*(is_present_nonleaf(s, child_level) for s in old))
    return Claim(assumptions=assumptions, goal=sym.iff(flush, any_nonleaf), shown={"flush": flush})


def split_fills_every_empty_entry(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    child_level, old, new, _flushes, assumptions = _split_table(impl, v, case)
    huge_spte = v["huge_spte"]
    goal = []
    for index, (before, after) in enumerate(zip(old, new, strict=True)):
        mapped = sym.conj(
            is_present_leaf(after, child_level),
            sym.iff((after & PT_PAGE_SIZE_MASK) != 0, child_level > PG_LEVEL_4K),
            spte_to_pfn(after) == child_pfn(huge_spte, child_level, index),
        )
        goal.append(sym.implies((before & SPTE_MMU_PRESENT_MASK) == 0, mapped))
    return Claim(assumptions=assumptions, goal=goal)


def split_leaves_present_entries_untouched(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    _child_level, old, new, _flushes, assumptions = _split_table(impl, v, case)
    goal = [sym.implies((b & SPTE_MMU_PRESENT_MASK) != 0, a == b) for b, a in zip(old, new, strict=True)]
    return Claim(assumptions=assumptions, goal=goal)


def split_maps_every_gfn_or_flushes(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    child_level, old, new, flushes, assumptions = _split_table(impl, v, case)
    huge_spte = v["huge_spte"]
    # The reused page is direct: its present leaves already map their gfns
    # to the pfns the huge SPTE maps them to (kernel-brief invariant 23).
    reused_ok = [
        sym.implies(is_present_leaf(s, child_level), spte_to_pfn(s) == child_pfn(huge_spte, child_level, i))
        for i, s in enumerate(old)
    ]
    # gfn huge_gfn + index * pages + offset goes through entry @index
    # (index_helpers_agree), so it maps huge_pfn + (gfn - huge_gfn) exactly
    # when entry @index is a present leaf at pfn huge_pfn + index * pages.
    # Each conjunct asks for that or for this entry's own flush request,
    # which implies the claim with the split's flush (the OR of them all).
    # It is asked twice, once for an entry present before the loop and once
    # for an empty one, the loop's own branch: Z3 refutes the two halves in
    # well under half the time it takes for the whole (10 s against 24 s).
    goal = []
    for i, (before, after) in enumerate(zip(old, new, strict=True)):
        mapped = sym.disj(
            sym.conj(is_present_leaf(after, child_level), spte_to_pfn(after) == child_pfn(huge_spte, child_level, i)),
            flushes[i],
        )
        present = (before & SPTE_MMU_PRESENT_MASK) != 0
        goal += [sym.implies(present, mapped), sym.implies(sym_not(present), mapped)]
    return Claim(
        assumptions=assumptions,
        goal=goal,
        local=[[ok] for ok in reused_ok for _half in range(2)],
        local_vars=[[spt_name(i)] for i in range(SPTE_ENT_PER_PAGE) for _half in range(2)],
        shown={"flush": sym.disj(*flushes)},
    )


def _lshr(x: Any, n: int) -> Any:
    return z3.LShR(x, n) if sym.is_symbolic(x) else x >> n


def split_keeps_min_free_mmu_pages(impl: Impl, v: dict[str, Any], case: dict[str, int]) -> Claim:
    n_max, n_used = v["n_max_mmu_pages"], v["n_used_mmu_pages"]
    allocated, zapped = v["sps_allocated"], v["sps_zapped"]
    before = kvm_mmu_available_pages(n_max, n_used)
    after = kvm_mmu_available_pages(n_max, n_used + allocated - zapped)
    return Claim(
        assumptions=[
            n_max >= 0,
            n_max < 1 << 64,
            n_used >= 0,
            n_used < 1 << 64,
            # shadow_mmu_get_sp_for_split() finds or allocates one page; its
            # lookup may zap unsync pages at the gfn, which only frees pages.
            allocated >= 0,
            allocated <= 1,
            zapped >= 0,
            zapped <= n_used,
            # The split starts: shadow_mmu_try_split_huge_page() did not refuse.
            sym_not(impl.policy.split_lacks_free_mmu_pages(before)),
        ],
        goal=after >= KVM_MIN_FREE_MMU_PAGES,
        shown={"available_before": before, "available_after": after},
    )


def sym_not(b: Any) -> Any:
    return z3.Not(b) if sym.is_symbolic(b) else not b


LOOP_SCOPE = "all 512 entries of the child page symbolic (non-present, present leaf or present non-leaf), all huge SPTEs, levels 2M and 1G, both mask sets"

QUERIES = (
    Query(
        name="split_flushes_iff_reused_nonleaf",
        proves="shadow_mmu_split_huge_page() requests a flush iff some present entry of the child page is a non-leaf",
        scope=LOOP_SCOPE,
        mutant="mutants/split_no_flush_on_nonleaf_reuse",
        variables=TABLE_VARS,
        claim=split_flushes_iff_reused_nonleaf,
        cases=LOOP_CASES,
    ),
    Query(
        name="split_fills_every_empty_entry",
        proves="every non-present entry becomes a present leaf mapping huge_pfn + index * pages, PS per level",
        scope=LOOP_SCOPE,
        mutant="mutants/split_pfn_offset_wrong_level",
        variables=TABLE_VARS,
        claim=split_fills_every_empty_entry,
        cases=LOOP_CASES,
    ),
    Query(
        name="split_leaves_present_entries_untouched",
        proves="every present entry of a reused child page is left as it was",
        scope=LOOP_SCOPE,
        mutant="twin/split_overwrites_present_leaves",
        variables=TABLE_VARS,
        claim=split_leaves_present_entries_untouched,
        cases=LOOP_CASES,
    ),
    Query(
        name="split_maps_every_gfn_or_flushes",
        proves="after the loop every gfn of the huge page maps huge_pfn + offset through a leaf, or the split flushes",
        scope=LOOP_SCOPE + "; every gfn offset in the huge page",
        mutant="mutants/split_no_flush_on_nonleaf_reuse",
        variables=TABLE_VARS,
        claim=split_maps_every_gfn_or_flushes,
        cases=LOOP_CASES,
    ),
    Query(
        name="split_keeps_min_free_mmu_pages",
        proves="a shadow split that starts never leaves kvm_mmu_available_pages() below KVM_MIN_FREE_MMU_PAGES",
        scope="all 64-bit n_max_mmu_pages and n_used_mmu_pages; one page allocated or reused, any number zapped",
        mutant="mutants/split_guard_lt",
        variables=tuple(
            Var(name=n, width=0) for n in ("n_max_mmu_pages", "n_used_mmu_pages", "sps_allocated", "sps_zapped")
        ),
        claim=split_keeps_min_free_mmu_pages,
        models=("merged", "v3"),
    ),
)
