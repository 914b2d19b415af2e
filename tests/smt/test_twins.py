"""The twin encodings and the symbolic runs of the split code agree with the model on ints.

properties/smt restates two pieces of model code as pure functions
(kvm_mmu_available_pages(), spte_write_protect_value()), and runs the split
policy's per-entry step and guard on Z3 terms.  Hypothesis draws concrete
values and both sides must agree.
"""

from __future__ import annotations

import z3
from hypothesis import given, settings
from hypothesis import strategies as st
from kvmsplit.properties.smt.spec import model_kvm, split_child_sp
from kvmsplit.properties.smt.twins import kvm_mmu_available_pages, spte_write_protect_value

from kvmsplit import shadow_mmu
from kvmsplit.kvm import Kvm
from kvmsplit.mmu_page import KvmMmuPage
from kvmsplit.rmap import Sptep
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.split import MERGED
from kvmsplit.spte import EPT_MASKS, SpteMasks
from tests.strategies import acc_bits, leaf_sptes, levels, mask_sets, masks_and_huge_sptes, spte_indexes

U64 = st.integers(0, (1 << 64) - 1)


def _value(term: z3.ExprRef, var: z3.ExprRef, value: int) -> int | bool:
    """The only value @term takes when @var is @value."""
    solver = z3.Solver()
    solver.add(var == value)
    assert solver.check() == z3.sat
    got = solver.model().eval(term, model_completion=True)
    if z3.is_bool(got):
        solver.add(term != got)
        assert solver.check() == z3.unsat
        return z3.is_true(got)
    solver.add(term != got)
    assert solver.check() == z3.unsat
    return got.as_long()


@settings(max_examples=100)
@given(n_max=U64, n_used=U64)
def test_available_pages_twin_agrees_with_the_kvm_method(n_max: int, n_used: int) -> None:
    kvm = Kvm.create("tdp")
    kvm.n_max_mmu_pages, kvm.n_used_mmu_pages = n_max, n_used
    assert kvm_mmu_available_pages(n_max, n_used) == kvm.kvm_mmu_available_pages()
    a, b = z3.Int("a"), z3.Int("b")
    symbolic = kvm_mmu_available_pages(a, b)
    solver = z3.Solver()
    solver.add(a == n_max, b == n_used, symbolic != kvm.kvm_mmu_available_pages())
    assert solver.check() == z3.unsat


@settings(max_examples=40)
@given(available=st.integers(0, 1 << 20))
def test_split_guard_on_a_z3_int_agrees_with_the_int_guard(available: int) -> None:
    n = z3.Int("available")
    symbolic = MERGED.split_lacks_free_mmu_pages(n)
    assert _value(symbolic, n, available) == MERGED.split_lacks_free_mmu_pages(available)


@settings(max_examples=60)
@given(m=mask_sets, level=levels, pt_protect=st.booleans(), data=st.data())
def test_write_protect_twin_agrees_with_spte_write_protect(
    m: SpteMasks, level: int, pt_protect: bool, data: st.DataObject
) -> None:
    spte = data.draw(leaf_sptes(m, level, ad_disabled=m is EPT_MASKS and data.draw(st.booleans())))
    kvm = Kvm.create("tdp" if m is EPT_MASKS else "shadow")
    sp = KvmMmuPage(role=KvmMmuPageRole(level=level, direct=True), gfn=0, pfn=kvm.alloc_page_table_pfn())
    sp.spt[3] = spte
    shadow_mmu.spte_write_protect(kvm, Sptep(sp, 3), pt_protect)
    assert sp.spt[3] == spte_write_protect_value(m, spte, pt_protect)
    s = z3.BitVec("spte", 64)
    assert _value(spte_write_protect_value(m, s, pt_protect), s, spte) == sp.spt[3]


@settings(max_examples=30, deadline=None)
@given(
    mls=masks_and_huge_sptes(), index=spte_indexes, access=acc_bits, nx=st.booleans(), old=st.one_of(st.just(0), U64)
)
def test_split_step_on_a_bitvec_agrees_with_the_int_step(
    mls: tuple[SpteMasks, int, int], index: int, access: int, nx: bool, old: int
) -> None:
    """MergedSplit.shadow_mmu_split_child() gives the same entry and flush on ints and on bit-vectors."""
    m, level, huge_spte = mls
    kvm = model_kvm(m is EPT_MASKS, nx)
    sp = split_child_sp(level - 1, access)
    want_spte, want_flush = MERGED.shadow_mmu_split_child(kvm, huge_spte, sp, index, old)
    s = z3.BitVec("spt", 64)
    got_spte, got_flush = MERGED.shadow_mmu_split_child(kvm, huge_spte, sp, index, s)
    assert _value(got_spte, s, old) == want_spte
    got = _value(got_flush, s, old) if isinstance(got_flush, z3.ExprRef) else got_flush
    assert bool(got) == bool(want_flush)
