"""Unit tests for kvmsplit/spte.py (arch/x86/kvm/mmu/spte.h and spte.c)."""

from __future__ import annotations

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsplit.errors import KvmBugOn
from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, KvmMemorySlot, dirty_bitmap_gfns, kvm_dirty_bitmap_bytes
from kvmsplit.mmu_page import KvmMmuPage
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    EPT_MASKS,
    KVM_PAGES_PER_HPAGE,
    MMIO_SPTE_GEN_MASK,
    NON_EPT_MASKS,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    REMOVED_SPTE,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    SPTE_BASE_ADDR_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    SpteMasks,
    check_spte_writable_invariants,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_access_track_spte,
    is_executable_pte,
    is_large_pte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_removed_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_huge_page_split_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_spte,
    mark_spte_for_access_track,
    restore_acc_track_spte,
    spte_ad_enabled,
    spte_to_pfn,
    spte_writable_triad_holds,
)
from tests.strategies import (
    INVALID_WRITABLE_TRIADS,
    MASK_SETS,
    VALID_WRITABLE_TRIADS,
    acc_bits,
    host_aligned_pfns,
    huge_levels,
    leaf_sptes,
    levels,
    mask_sets,
    masks_and_huge_sptes,
    mmio_generations,
    pfns,
    spte_indexes,
    triad_bits,
)

SAVED_BITS = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
Z3_TIMEOUT_MS = 5000

mask_ids = pytest.mark.parametrize("m", MASK_SETS, ids=lambda m: m.name)


# --- Bit layout (kvm_mmu_reset_all_pte_masks(), kvm_mmu_set_ept_masks()). ----


@pytest.mark.parametrize(
    ("m", "field", "bit"),
    [
        (NON_EPT_MASKS, "shadow_present_mask", 0),
        (NON_EPT_MASKS, "shadow_user_mask", 2),
        (NON_EPT_MASKS, "shadow_accessed_mask", 5),
        (NON_EPT_MASKS, "shadow_dirty_mask", 6),
        (NON_EPT_MASKS, "shadow_host_writable_mask", 9),
        (NON_EPT_MASKS, "shadow_mmu_writable_mask", 10),
        (NON_EPT_MASKS, "shadow_nx_mask", 63),
        (EPT_MASKS, "shadow_present_mask", 0),
        (EPT_MASKS, "shadow_user_mask", 0),
        (EPT_MASKS, "shadow_x_mask", 2),
        (EPT_MASKS, "shadow_accessed_mask", 8),
        (EPT_MASKS, "shadow_dirty_mask", 9),
        (EPT_MASKS, "shadow_host_writable_mask", 57),
        (EPT_MASKS, "shadow_mmu_writable_mask", 58),
    ],
    ids=lambda v: v.name if isinstance(v, SpteMasks) else str(v),
)
def test_mask_set_puts_each_bit_where_the_kernel_does(m: SpteMasks, field: str, bit: int) -> None:
    assert getattr(m, field) == 1 << bit


def test_non_ept_layout_marks_exec_with_nx_and_ept_with_x() -> None:
    """Exactly one of shadow_x_mask and shadow_nx_mask is in use per layout."""
    assert NON_EPT_MASKS.shadow_x_mask == 0
    assert EPT_MASKS.shadow_nx_mask == 0


def test_architectural_and_software_bits_shared_by_both_layouts() -> None:
    """W is bit 1, PS bit 7 and MMU-present bit 11 in both layouts (spte.h)."""
    assert PT_WRITABLE_MASK == 1 << 1
    assert PT_PAGE_SIZE_MASK == 1 << 7
    assert SPTE_MMU_PRESENT_MASK == 1 << 11
    assert SPTE_TDP_AD_MASK == (1 << 52) | (1 << 53)
    assert SAVED_BITS == (1 << 54) | (1 << 56)


@mask_ids
def test_software_writable_bits_stay_out_of_the_pfn_field_and_apart(m: SpteMasks) -> None:
    software = (m.shadow_host_writable_mask, m.shadow_mmu_writable_mask, SPTE_MMU_PRESENT_MASK)
    for bit in software:
        assert bit & SPTE_BASE_ADDR_MASK == 0
        assert bit & PT_WRITABLE_MASK == 0
    assert len({*software}) == len(software)


# --- The writable triad (check_spte_writable_invariants()). -------------------


@mask_ids
@pytest.mark.parametrize("triad", VALID_WRITABLE_TRIADS)
def test_valid_writable_triad_passes_the_checker_and_the_predicate(m: SpteMasks, triad: tuple[int, int, int]) -> None:
    spte = SPTE_MMU_PRESENT_MASK | triad_bits(m, triad)
    assert spte_writable_triad_holds(m, spte)
    check_spte_writable_invariants(m, spte)


@mask_ids
@pytest.mark.parametrize("triad", INVALID_WRITABLE_TRIADS)
def test_bad_writable_triad_fails_the_predicate_and_warns(m: SpteMasks, triad: tuple[int, int, int]) -> None:
    """check_spte_writable_invariants() WARNs on W without MMU-writable or MMU-writable without Host-writable."""
    spte = SPTE_MMU_PRESENT_MASK | triad_bits(m, triad)
    assert not spte_writable_triad_holds(m, spte)
    with pytest.raises(KvmBugOn) as excinfo:
        check_spte_writable_invariants(m, spte)
    assert excinfo.value.site == "check_spte_writable_invariants"


# --- make_nonleaf_spte(). -------------------------------------------------------


@settings(max_examples=60)
@given(m=mask_sets, child_pfn=pfns, ad_disabled=st.booleans())
def test_nonleaf_spte_is_present_never_huge_and_grants_every_access(
    m: SpteMasks, child_pfn: int, ad_disabled: bool
) -> None:
    """make_nonleaf_spte(): fast_page_fault() relies on upper levels granting ACC_ALL."""
    spte = make_nonleaf_spte(m, child_pfn, ad_disabled)
    assert is_shadow_present_pte(spte)
    assert not is_large_pte(spte)
    assert is_writable_pte(spte)
    assert spte & m.shadow_user_mask
    assert is_executable_pte(m, spte)
    assert spte_to_pfn(spte) == child_pfn
    if ad_disabled:
        assert spte & SPTE_TDP_AD_MASK == SPTE_TDP_AD_DISABLED
    else:
        assert spte & m.shadow_accessed_mask
        assert spte_ad_enabled(spte)


# --- MMIO SPTEs (make_mmio_spte()). ---------------------------------------------


@settings(max_examples=80)
@given(m=mask_sets, gen=mmio_generations, gfn=st.integers(0, (1 << 39) - 1), access=acc_bits)
def test_mmio_spte_is_never_shadow_present_and_round_trips_gen_and_gfn(
    m: SpteMasks, gen: int, gfn: int, access: int
) -> None:
    """MMIO SPTEs lack bit 11, so rmaps never see them; check_mmio_spte() compares the generation."""
    spte = make_mmio_spte(m, gen, gfn, access)
    assert not is_shadow_present_pte(spte)
    assert is_mmio_spte(m, spte)
    assert get_mmio_spte_generation(spte) == gen
    assert get_mmio_spte_gfn(spte) == gfn


@mask_ids
def test_mmio_spte_keeps_only_the_low_19_generation_bits(m: SpteMasks) -> None:
    """make_mmio_spte() masks the memslots generation with MMIO_SPTE_GEN_MASK."""
    assert MMIO_SPTE_GEN_MASK == (1 << 19) - 1
    spte = make_mmio_spte(m, (1 << 19) | 0x5A5A5, 0x1234, ACC_ALL)
    assert get_mmio_spte_generation(spte) == 0x5A5A5


def test_mmio_spte_access_is_masked_per_layout() -> None:
    """Non-EPT MMIO SPTEs cache W and U; EPT's shadow_mmio_access_mask is 0."""
    non_ept = make_mmio_spte(NON_EPT_MASKS, 0, 0, ACC_ALL)
    assert non_ept == NON_EPT_MASKS.shadow_mmio_value | ACC_WRITE_MASK | ACC_USER_MASK
    ept = make_mmio_spte(EPT_MASKS, 0, 0, ACC_ALL)
    assert ept == EPT_MASKS.shadow_mmio_value


# --- REMOVED_SPTE. ---------------------------------------------------------------


@mask_ids
def test_removed_spte_is_neither_present_nor_mmio(m: SpteMasks) -> None:
    """kvm_mmu_set_mmio_spte_mask() refuses an MMIO value that REMOVED_SPTE would match."""
    assert is_removed_spte(REMOVED_SPTE)
    assert not is_shadow_present_pte(REMOVED_SPTE)
    assert not is_mmio_spte(m, REMOVED_SPTE)
    assert REMOVED_SPTE & 0x7 == 0
    assert spte_to_pfn(REMOVED_SPTE) == 0


# --- Access tracking (mark_spte_for_access_track(), restore_acc_track_spte()). ---


@settings(max_examples=80)
@given(data=st.data(), level=levels)
def test_access_tracking_an_ad_disabled_ept_spte_round_trips_all_but_w(data: st.DataObject, level: int) -> None:
    """W is not saved: fast_page_fault() regains it through MMU-writable."""
    spte = data.draw(leaf_sptes(EPT_MASKS, level, ad_disabled=True))
    tracked = mark_spte_for_access_track(EPT_MASKS, spte)
    assert is_access_track_spte(EPT_MASKS, tracked)
    assert tracked & EPT_MASKS.shadow_acc_track_mask == 0
    assert is_shadow_present_pte(tracked)
    assert is_mmu_writable_spte(EPT_MASKS, tracked) == is_mmu_writable_spte(EPT_MASKS, spte)
    assert restore_acc_track_spte(EPT_MASKS, tracked) == spte & ~PT_WRITABLE_MASK


@settings(max_examples=40)
@given(data=st.data(), level=levels)
def test_access_tracking_saves_r_and_x_in_bits_54_and_56(data: st.DataObject, level: int) -> None:
    spte = data.draw(leaf_sptes(EPT_MASKS, level, ad_disabled=True))
    tracked = mark_spte_for_access_track(EPT_MASKS, spte)
    assert bool(tracked & (1 << 54)) == bool(spte & 1)
    assert bool(tracked & (1 << 56)) == bool(spte & 4)
    assert tracked & (1 << 55) == 0


@settings(max_examples=40)
@given(data=st.data(), level=levels)
def test_access_tracking_an_access_tracked_spte_changes_nothing(data: st.DataObject, level: int) -> None:
    spte = data.draw(leaf_sptes(EPT_MASKS, level, ad_disabled=True))
    tracked = mark_spte_for_access_track(EPT_MASKS, spte)
    assert mark_spte_for_access_track(EPT_MASKS, tracked) == tracked


@settings(max_examples=60)
@given(m=mask_sets, level=levels, data=st.data())
def test_access_tracking_an_ad_enabled_spte_only_clears_a(m: SpteMasks, level: int, data: st.DataObject) -> None:
    spte = data.draw(leaf_sptes(m, level))
    assert mark_spte_for_access_track(m, spte) == spte & ~m.shadow_accessed_mask


def test_access_tracking_warns_on_a_bad_writable_triad() -> None:
    """mark_spte_for_access_track() checks the triad before it drops W."""
    spte = SPTE_MMU_PRESENT_MASK | SPTE_TDP_AD_DISABLED | 0x7 | PT_WRITABLE_MASK
    with pytest.raises(KvmBugOn):
        mark_spte_for_access_track(EPT_MASKS, spte)


def test_access_tracking_warns_when_the_saved_bits_are_already_set() -> None:
    spte = SPTE_MMU_PRESENT_MASK | SPTE_TDP_AD_DISABLED | 0x5 | (1 << 54)
    with pytest.raises(KvmBugOn) as excinfo:
        mark_spte_for_access_track(EPT_MASKS, spte)
    assert excinfo.value.site == "mark_spte_for_access_track"


# --- Huge page split (make_huge_page_split_spte()). -----------------------------


@settings(max_examples=100)
@given(mls=masks_and_huge_sptes(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_child_maps_huge_pfn_plus_offset(
    mls: tuple[SpteMasks, int, int], index: int, access: int, nx: bool
) -> None:
    m, level, huge_spte = mls
    child = make_huge_page_split_spte(m, huge_spte, level - 1, access, index, nx)
    assert spte_to_pfn(child) == spte_to_pfn(huge_spte) + index * KVM_PAGES_PER_HPAGE(level - 1)
    assert is_shadow_present_pte(child)


@settings(max_examples=60)
@given(mls=masks_and_huge_sptes(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_clears_ps_only_at_4k(mls: tuple[SpteMasks, int, int], index: int, access: int, nx: bool) -> None:
    m, level, huge_spte = mls
    child = make_huge_page_split_spte(m, huge_spte, level - 1, access, index, nx)
    assert is_large_pte(child) == (level - 1 > PG_LEVEL_4K)


@settings(max_examples=100)
@given(mls=masks_and_huge_sptes(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_child_inherits_writable_triad_ad_and_memtype(
    mls: tuple[SpteMasks, int, int], index: int, access: int, nx: bool
) -> None:
    """kvm_mmu_slot_try_split_huge_pages() decides its flush from the children's W and D bits."""
    m, level, huge_spte = mls
    kept = (
        PT_WRITABLE_MASK
        | m.shadow_mmu_writable_mask
        | m.shadow_host_writable_mask
        | m.shadow_accessed_mask
        | m.shadow_dirty_mask
        | m.shadow_memtype_mask
        | m.shadow_user_mask
        | SPTE_TDP_AD_MASK
    )
    child = make_huge_page_split_spte(m, huge_spte, level - 1, access, index, nx)
    assert child & kept == huge_spte & kept
    assert spte_writable_triad_holds(m, child)


@settings(max_examples=60)
@given(m=mask_sets, data=st.data(), index=spte_indexes)
def test_split_to_4k_grants_exec_under_the_nx_huge_page_mitigation(
    m: SpteMasks, data: st.DataObject, index: int
) -> None:
    """make_huge_page_split_spte() gives back the exec right make_spte() withheld from the huge page."""
    huge_spte = data.draw(leaf_sptes(m, PG_LEVEL_2M))
    huge_spte = (huge_spte & ~m.shadow_x_mask) | m.shadow_nx_mask
    assert not is_executable_pte(m, huge_spte)
    child = make_huge_page_split_spte(m, huge_spte, PG_LEVEL_4K, ACC_ALL, index, True)
    assert is_executable_pte(m, child)


@settings(max_examples=60)
@given(m=mask_sets, data=st.data(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_to_2m_keeps_the_huge_spte_exec_state(
    m: SpteMasks, data: st.DataObject, index: int, access: int, nx: bool
) -> None:
    """The NX mitigation still applies to the 2M children of a 1G page."""
    huge_spte = data.draw(leaf_sptes(m, PG_LEVEL_1G))
    child = make_huge_page_split_spte(m, huge_spte, PG_LEVEL_2M, access, index, nx)
    assert is_executable_pte(m, child) == is_executable_pte(m, huge_spte)


@settings(max_examples=60)
@given(m=mask_sets, data=st.data(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_to_4k_keeps_exec_state_without_exec_access_or_mitigation(
    m: SpteMasks, data: st.DataObject, index: int, access: int, nx: bool
) -> None:
    huge_spte = data.draw(leaf_sptes(m, PG_LEVEL_2M))
    if access & ACC_EXEC_MASK and nx:
        access &= ~ACC_EXEC_MASK
    child = make_huge_page_split_spte(m, huge_spte, PG_LEVEL_4K, access, index, nx)
    assert is_executable_pte(m, child) == is_executable_pte(m, huge_spte)


@settings(max_examples=40)
@given(data=st.data(), index=spte_indexes)
def test_split_of_an_access_tracked_huge_spte_stays_tracked_and_saves_exec(data: st.DataObject, index: int) -> None:
    """make_spte_executable() restores, sets X, and re-marks an access-tracked SPTE."""
    huge_spte = data.draw(leaf_sptes(EPT_MASKS, PG_LEVEL_2M, ad_disabled=True))
    huge_spte &= ~EPT_MASKS.shadow_x_mask
    tracked = mark_spte_for_access_track(EPT_MASKS, huge_spte)
    child = make_huge_page_split_spte(EPT_MASKS, tracked, PG_LEVEL_4K, ACC_ALL, index, True)
    assert is_access_track_spte(EPT_MASKS, child)
    assert child & EPT_MASKS.shadow_acc_track_mask == 0
    assert is_executable_pte(EPT_MASKS, restore_acc_track_spte(EPT_MASKS, child))


@mask_ids
def test_split_of_a_non_present_or_small_spte_is_a_bug(m: SpteMasks) -> None:
    """make_huge_page_split_spte() KVM_BUG_ONs unless the SPTE is a present huge leaf."""
    huge = SPTE_MMU_PRESENT_MASK | m.shadow_present_mask | PT_PAGE_SIZE_MASK
    with pytest.raises(KvmBugOn):
        make_huge_page_split_spte(m, huge & ~SPTE_MMU_PRESENT_MASK, PG_LEVEL_4K, ACC_ALL, 0, False)
    with pytest.raises(KvmBugOn):
        make_huge_page_split_spte(m, huge & ~PT_PAGE_SIZE_MASK, PG_LEVEL_4K, ACC_ALL, 0, False)


# --- The same helpers on Z3 bit-vectors. -----------------------------------------


def _agrees(symbolic: z3.BitVecRef, s: z3.BitVecRef, value: int, expected: int) -> None:
    """Check that @symbolic with @s fixed to @value can only equal @expected."""
    solver = z3.Solver()
    solver.set("timeout", Z3_TIMEOUT_MS)
    solver.add(s == value)
    assert solver.check() == z3.sat, "the assumption alone must be satisfiable"
    solver.add(symbolic != expected)
    assert solver.check() == z3.unsat


@settings(max_examples=15, deadline=None)
@given(mls=masks_and_huge_sptes(), index=spte_indexes, access=acc_bits, nx=st.booleans())
def test_split_on_a_bitvec_agrees_with_the_int_split(
    mls: tuple[SpteMasks, int, int], index: int, access: int, nx: bool
) -> None:
    m, level, huge_spte = mls
    s = z3.BitVec("s", 64)
    symbolic = make_huge_page_split_spte(m, s, level - 1, access, index, nx)
    _agrees(symbolic, s, huge_spte, make_huge_page_split_spte(m, huge_spte, level - 1, access, index, nx))


@settings(max_examples=10, deadline=None)
@given(data=st.data(), index=spte_indexes)
def test_split_of_a_tracked_spte_on_a_bitvec_agrees_with_the_int_split(data: st.DataObject, index: int) -> None:
    tracked = mark_spte_for_access_track(EPT_MASKS, data.draw(leaf_sptes(EPT_MASKS, PG_LEVEL_2M, ad_disabled=True)))
    s = z3.BitVec("s", 64)
    symbolic = make_huge_page_split_spte(EPT_MASKS, s, PG_LEVEL_4K, ACC_ALL, index, True)
    _agrees(symbolic, s, tracked, make_huge_page_split_spte(EPT_MASKS, tracked, PG_LEVEL_4K, ACC_ALL, index, True))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), level=levels)
def test_restore_acc_track_on_a_bitvec_agrees_with_the_int_restore(data: st.DataObject, level: int) -> None:
    tracked = mark_spte_for_access_track(EPT_MASKS, data.draw(leaf_sptes(EPT_MASKS, level, ad_disabled=True)))
    s = z3.BitVec("s", 64)
    _agrees(restore_acc_track_spte(EPT_MASKS, s), s, tracked, restore_acc_track_spte(EPT_MASKS, tracked))


def _split_pfn_claim(m: SpteMasks, child_level: int, assume_aligned: bool) -> z3.CheckSatResult:
    """Search for a huge SPTE and index whose child pfn is not huge pfn + index * pages."""
    s = z3.BitVec("huge_spte", 64)
    index = z3.BitVec("index", 64)
    pages = KVM_PAGES_PER_HPAGE(child_level)
    child = make_huge_page_split_spte(m, s, child_level, ACC_ALL, index, True)
    solver = z3.Solver()
    solver.set("timeout", Z3_TIMEOUT_MS)
    solver.add(z3.ULT(index, 512))
    if assume_aligned:
        solver.add(s & (((pages * 512) - 1) << PAGE_SHIFT) == 0)
    assert solver.check() == z3.sat, "the assumptions alone must be satisfiable"
    solver.add(spte_to_pfn(child) != spte_to_pfn(s) + index * pages)
    return solver.check()


@mask_ids
@pytest.mark.parametrize("child_level", [PG_LEVEL_4K, PG_LEVEL_2M])
def test_split_pfn_offset_is_proved_for_every_aligned_huge_spte(m: SpteMasks, child_level: int) -> None:
    """OR-ing the offset equals adding it because a huge SPTE's pfn is size-aligned."""
    assert _split_pfn_claim(m, child_level, assume_aligned=True) == z3.unsat


@mask_ids
@pytest.mark.parametrize("child_level", [PG_LEVEL_4K, PG_LEVEL_2M])
def test_split_pfn_offset_is_refuted_without_the_alignment_assumption(m: SpteMasks, child_level: int) -> None:
    """The broken twin of the proof above: Z3 must find a counterexample."""
    assert _split_pfn_claim(m, child_level, assume_aligned=False) == z3.sat


# --- make_spte(). ------------------------------------------------------------------


def _direct_sp(kvm: Kvm, level: int, ad_disabled: bool = False) -> KvmMmuPage:
    role = KvmMmuPageRole(level=level, direct=True, ad_disabled=ad_disabled)
    return KvmMmuPage(role=role, gfn=0, pfn=kvm.alloc_page_table_pfn())


def _make_spte(
    kvm: Kvm,
    level: int,
    pte_access: int,
    *,
    host_writable: bool = True,
    prefetch: bool = False,
    slot: KvmMemorySlot | None = None,
    ad_disabled: bool = False,
    gfn: int = 0,
    pfn: int | None = None,
) -> tuple[bool, int]:
    sp = _direct_sp(kvm, level, ad_disabled)
    if pfn is None:
        pfn = 0x100000 + gfn
    return make_spte(kvm, sp, slot, pte_access, gfn, pfn, 0, prefetch, False, host_writable)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
@pytest.mark.parametrize("level", [PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G])
def test_make_spte_sets_ps_above_4k_only(config: str, level: int) -> None:
    kvm = Kvm.create(config)
    _, spte = _make_spte(kvm, level, ACC_ALL)
    assert is_shadow_present_pte(spte)
    assert is_large_pte(spte) == (level > PG_LEVEL_4K)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
@pytest.mark.parametrize("level", [PG_LEVEL_2M, PG_LEVEL_1G])
def test_make_spte_strips_exec_above_4k_under_nx_huge_pages(config: str, level: int) -> None:
    """make_spte() drops ACC_EXEC_MASK above 4K when is_nx_huge_page_enabled()."""
    kvm = Kvm.create(config, nx_huge_pages=True)
    _, spte = _make_spte(kvm, level, ACC_ALL)
    assert not is_executable_pte(kvm.masks, spte)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
def test_make_spte_keeps_exec_at_4k_under_nx_huge_pages(config: str) -> None:
    kvm = Kvm.create(config, nx_huge_pages=True)
    _, spte = _make_spte(kvm, PG_LEVEL_4K, ACC_ALL)
    assert is_executable_pte(kvm.masks, spte)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
@pytest.mark.parametrize("level", [PG_LEVEL_2M, PG_LEVEL_1G])
def test_make_spte_keeps_exec_above_4k_without_nx_huge_pages(config: str, level: int) -> None:
    kvm = Kvm.create(config, nx_huge_pages=False)
    _, spte = _make_spte(kvm, level, ACC_ALL)
    assert is_executable_pte(kvm.masks, spte)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
@pytest.mark.parametrize("level", [PG_LEVEL_4K, PG_LEVEL_2M])
def test_make_spte_without_host_writable_clears_w_and_mmu_writable(config: str, level: int) -> None:
    """A host read-only page gets the (0,0,0) triad; wrprot stays false (make_spte())."""
    kvm = Kvm.create(config)
    wrprot, spte = _make_spte(kvm, level, ACC_ALL, host_writable=False)
    m = kvm.masks
    assert not wrprot
    assert spte & m.shadow_host_writable_mask == 0
    assert not is_writable_pte(spte)
    assert not is_mmu_writable_spte(m, spte)


@pytest.mark.parametrize("config", ["tdp", "shadow"])
def test_make_spte_with_write_access_sets_the_full_writable_triad_and_d(config: str) -> None:
    kvm = Kvm.create(config)
    wrprot, spte = _make_spte(kvm, PG_LEVEL_4K, ACC_ALL)
    m = kvm.masks
    assert not wrprot
    assert spte & triad_bits(m, (1, 1, 1)) == triad_bits(m, (1, 1, 1))
    assert spte & m.shadow_dirty_mask
    assert spte & m.shadow_accessed_mask


@settings(max_examples=60)
@given(
    config=st.sampled_from(["tdp", "shadow"]),
    level=levels,
    pte_access=acc_bits,
    host_writable=st.booleans(),
    prefetch=st.booleans(),
    nx=st.booleans(),
    pfn=host_aligned_pfns(PG_LEVEL_1G),
)
def test_make_spte_result_keeps_the_writable_triad_and_the_pfn(
    config: str, level: int, pte_access: int, host_writable: bool, prefetch: bool, nx: bool, pfn: int
) -> None:
    kvm = Kvm.create(config, nx_huge_pages=nx)
    _, spte = _make_spte(kvm, level, pte_access, host_writable=host_writable, prefetch=prefetch, pfn=pfn)
    assert spte_writable_triad_holds(kvm.masks, spte)
    assert spte_to_pfn(spte) == pfn
    if kvm.masks is NON_EPT_MASKS:
        # EPT's user bit is R, which shadow_present_mask sets anyway.
        assert bool(spte & kvm.masks.shadow_user_mask) == bool(pte_access & ACC_USER_MASK)


def test_make_spte_for_an_ad_disabled_page_marks_the_ad_type_and_sets_no_a() -> None:
    kvm = Kvm.create("tdp")
    _, spte = _make_spte(kvm, PG_LEVEL_4K, ACC_ALL, ad_disabled=True)
    assert spte & SPTE_TDP_AD_MASK == SPTE_TDP_AD_DISABLED
    assert spte & kvm.masks.shadow_accessed_mask == 0
    assert spte & kvm.masks.shadow_dirty_mask == 0


@pytest.mark.parametrize("config", ["tdp", "shadow"])
def test_make_spte_for_a_prefetch_leaves_a_clear(config: str) -> None:
    """A prefetched SPTE starts out access-tracked (mark_spte_for_access_track())."""
    kvm = Kvm.create(config)
    _, spte = _make_spte(kvm, PG_LEVEL_4K, ACC_ALL, prefetch=True)
    assert spte & kvm.masks.shadow_accessed_mask == 0


def _dirty_logged_slot() -> KvmMemorySlot:
    slot = KvmMemorySlot(id=0, base_gfn=0, npages=1024, userspace_addr=0, flags=KVM_MEM_LOG_DIRTY_PAGES)
    slot.dirty_bitmap = bytearray(kvm_dirty_bitmap_bytes(slot))
    return slot


def test_make_spte_marks_a_writable_4k_page_dirty_in_a_dirty_logged_slot() -> None:
    kvm = Kvm.create("tdp")
    slot = _dirty_logged_slot()
    _make_spte(kvm, PG_LEVEL_4K, ACC_ALL, slot=slot, gfn=77)
    assert dirty_bitmap_gfns(slot) == [77]


def test_make_spte_leaves_the_dirty_bitmap_alone_for_a_read_only_spte() -> None:
    kvm = Kvm.create("tdp")
    slot = _dirty_logged_slot()
    _make_spte(kvm, PG_LEVEL_4K, ACC_EXEC_MASK | ACC_USER_MASK, slot=slot, gfn=77)
    assert dirty_bitmap_gfns(slot) == []


def test_make_spte_warns_on_a_writable_huge_spte_in_a_dirty_logged_slot() -> None:
    """kvm_mmu_hugepage_adjust() keeps dirty-logged slots at 4K; make_spte() WARNs otherwise."""
    kvm = Kvm.create("tdp")
    with pytest.raises(KvmBugOn) as excinfo:
        _make_spte(kvm, PG_LEVEL_2M, ACC_ALL, slot=_dirty_logged_slot(), gfn=512)
    assert excinfo.value.site == "make_spte"


@settings(max_examples=30)
@given(level=huge_levels, pfn=host_aligned_pfns(PG_LEVEL_1G), index=spte_indexes, nx=st.booleans())
def test_split_of_a_make_spte_huge_page_is_what_make_spte_builds_at_the_child_level(
    level: int, pfn: int, index: int, nx: bool
) -> None:
    """Eager splitting must not change what the guest can do (make_huge_page_split_spte())."""
    kvm = Kvm.create("tdp", nx_huge_pages=nx)
    _, huge_spte = _make_spte(kvm, level, ACC_ALL, pfn=pfn)
    child = make_huge_page_split_spte(kvm.masks, huge_spte, level - 1, ACC_ALL, index, nx)
    _, direct = _make_spte(kvm, level - 1, ACC_ALL, pfn=pfn + index * KVM_PAGES_PER_HPAGE(level - 1))
    assert child == direct
