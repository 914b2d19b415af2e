"""Unit tests for kvmsplit/mmu_page.py (struct kvm_mmu_page, the page hash, mmu.c helpers)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvmsplit.errors import KvmBugOn
from kvmsplit.mmu_page import (
    KVM_MMU_HASH_SHIFT,
    KVM_NUM_MMU_PAGES,
    KvmMmuPage,
    hash_64,
    kvm_mmu_child_role,
    kvm_mmu_page_get_access,
    kvm_mmu_page_get_gfn,
    kvm_mmu_page_set_access,
    kvm_mmu_page_set_translation,
    new_table,
    sp_has_gptes,
)
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, PG_LEVEL_4K, SPTE_ENT_PER_PAGE
from tests.strategies import acc_bits, roles, spte_indexes

U64 = (1 << 64) - 1
gfns = st.integers(0, (1 << 40) - 1)
page_levels = st.integers(1, 4)


def _sp(level: int, gfn: int, *, direct: bool, passthrough: bool = False, access: int = ACC_ALL) -> KvmMmuPage:
    role = KvmMmuPageRole(level=level, direct=direct, passthrough=passthrough, access=access)
    sp = KvmMmuPage(role=role, gfn=gfn, pfn=0x1000)
    if not direct:
        sp.shadowed_translation = new_table()
    return sp


# --- hash_64() (include/linux/hash.h). -------------------------------------------


@settings(max_examples=200)
@given(val=st.integers(0, U64), bits=st.integers(1, 63))
def test_hash_64_is_the_golden_ratio_multiply_keeping_the_top_bits(val: int, bits: int) -> None:
    expected = ((val * 0x61C8864680B583EB) % (1 << 64)) >> (64 - bits)
    assert hash_64(val, bits) == expected


@settings(max_examples=100)
@given(gfn=gfns)
def test_page_hash_bucket_is_one_of_4096(gfn: int) -> None:
    """mmu_page_hash has KVM_NUM_MMU_PAGES buckets indexed by hash_64(gfn, KVM_MMU_HASH_SHIFT)."""
    assert KVM_NUM_MMU_PAGES == 4096
    assert 0 <= hash_64(gfn, KVM_MMU_HASH_SHIFT) < KVM_NUM_MMU_PAGES


def test_hash_64_spreads_consecutive_gfns() -> None:
    buckets = {hash_64(gfn, KVM_MMU_HASH_SHIFT) for gfn in range(512)}
    assert len(buckets) > 400


# --- struct kvm_mmu_page. -------------------------------------------------------------


def test_new_page_table_is_512_zero_entries() -> None:
    spt = new_table()
    assert len(spt) == SPTE_ENT_PER_PAGE
    assert spt.itemsize == 8
    assert not any(spt)


def test_two_identical_pages_are_distinct_pointers() -> None:
    """Sptep equality, and so rmap removal, relies on pages comparing by identity."""
    a = _sp(1, 0, direct=True)
    b = _sp(1, 0, direct=True)
    assert a != b
    assert a == a


@settings(max_examples=50)
@given(role=roles)
def test_sp_has_gptes_only_for_indirect_non_passthrough_pages(role: KvmMmuPageRole) -> None:
    sp = KvmMmuPage(role=role, gfn=0, pfn=0x1000)
    assert sp_has_gptes(sp) == (not role.direct and not role.passthrough)


# --- kvm_mmu_page_get_gfn() / _get_access() / _set_translation(). -----------------


@settings(max_examples=100)
@given(level=page_levels, gfn=gfns, index=spte_indexes)
def test_direct_page_entry_maps_base_gfn_plus_index_times_child_size(level: int, gfn: int, index: int) -> None:
    """kvm_mmu_page_get_gfn(): direct → sp->gfn + (index << ((level - 1) * 9))."""
    sp = _sp(level, gfn, direct=True)
    assert kvm_mmu_page_get_gfn(sp, index) == gfn + (index << (9 * (level - 1)))


@settings(max_examples=100)
@given(level=page_levels, gfn=gfns, index=spte_indexes, target=gfns, access=acc_bits)
def test_indirect_page_entry_maps_what_shadowed_translation_records(
    level: int, gfn: int, index: int, target: int, access: int
) -> None:
    """kvm_mmu_page_get_gfn()/_get_access(): indirect → shadowed_translation[index]."""
    sp = _sp(level, gfn, direct=False)
    kvm_mmu_page_set_translation(sp, index, target, access)
    assert sp.shadowed_translation is not None
    assert sp.shadowed_translation[index] == (target << 12) | access
    assert kvm_mmu_page_get_gfn(sp, index) == target
    assert kvm_mmu_page_get_access(sp, index) == access


@settings(max_examples=30)
@given(gfn=gfns, index=spte_indexes)
def test_passthrough_page_entry_maps_the_page_gfn(gfn: int, index: int) -> None:
    sp = _sp(4, gfn, direct=False, passthrough=True)
    assert kvm_mmu_page_get_gfn(sp, index) == gfn


@settings(max_examples=30)
@given(level=page_levels, access=acc_bits, index=spte_indexes)
def test_direct_page_access_is_the_role_access(level: int, access: int, index: int) -> None:
    """A direct page under an indirect MMU carries the guest huge page's access in its role."""
    sp = _sp(level, 0, direct=True, access=access)
    assert kvm_mmu_page_get_access(sp, index) == access


def test_set_translation_on_a_direct_page_accepts_matching_values() -> None:
    sp = _sp(2, 0x40000, direct=True)
    kvm_mmu_page_set_translation(sp, 3, 0x40000 + 3 * 512, ACC_ALL)
    kvm_mmu_page_set_access(sp, 3, ACC_ALL)
    assert sp.shadowed_translation is None


def test_set_translation_on_a_direct_page_warns_on_a_mismatching_gfn() -> None:
    """kvm_mmu_page_set_translation() WARNs: a direct page's gfn is computed, never stored."""
    sp = _sp(2, 0x40000, direct=True)
    with pytest.raises(KvmBugOn) as excinfo:
        kvm_mmu_page_set_translation(sp, 3, 0x40000 + 3 * 512 + 1, ACC_ALL)
    assert excinfo.value.site == "kvm_mmu_page_set_translation"
    assert "gfn mismatch" in excinfo.value.message


def test_set_translation_on_a_direct_page_warns_on_a_mismatching_access() -> None:
    sp = _sp(1, 0x200, direct=True)
    with pytest.raises(KvmBugOn) as excinfo:
        kvm_mmu_page_set_translation(sp, 0, 0x200, ACC_USER_MASK)
    assert "access mismatch" in excinfo.value.message


# --- kvm_mmu_child_role(). ---------------------------------------------------------


@settings(max_examples=100)
@given(parent_role=roles, index=spte_indexes, direct=st.booleans(), access=acc_bits)
def test_child_role_is_one_level_down_with_the_given_access_and_direct(
    parent_role: KvmMmuPageRole, index: int, direct: bool, access: int
) -> None:
    """kvm_mmu_child_role(): level-1, access and direct set, passthrough cleared, the rest inherited."""
    assume(parent_role.level > 1 and (parent_role.level == 2 or not parent_role.has_4_byte_gpte))
    parent = KvmMmuPage(role=parent_role, gfn=0, pfn=0x1000)
    child = kvm_mmu_child_role(parent, index, direct, access)
    assert child.level == parent_role.level - 1
    assert child.access == access
    assert child.direct == direct
    assert not child.passthrough
    inherited = ("invalid", "efer_nx", "cr0_wp", "smep_andnot_wp", "smap_andnot_wp")
    inherited += ("ad_disabled", "guest_mode", "smm", "has_4_byte_gpte")
    for name in inherited:
        assert getattr(child, name) == getattr(parent_role, name), name
    if not parent_role.has_4_byte_gpte:
        assert child.quadrant == parent_role.quadrant


@pytest.mark.parametrize("index", [0, 1, 2, 511])
def test_child_role_of_a_4_byte_gpte_page_takes_the_quadrant_from_the_index(index: int) -> None:
    """A 32-bit guest table is shadowed by two 4K pages; quadrant = spte_index(sptep) & 1."""
    parent = KvmMmuPage(role=KvmMmuPageRole(level=2, has_4_byte_gpte=True), gfn=0, pfn=0x1000)
    child = kvm_mmu_child_role(parent, index, False, ACC_ALL)
    assert child.level == PG_LEVEL_4K
    assert child.quadrant == index & 1


def test_child_role_with_4_byte_gptes_above_4k_is_a_bug() -> None:
    """kvm_mmu_child_role() WARNs if has_4_byte_gpte reaches a non-4K child."""
    parent = KvmMmuPage(role=KvmMmuPageRole(level=3, has_4_byte_gpte=True), gfn=0, pfn=0x1000)
    with pytest.raises(KvmBugOn):
        kvm_mmu_child_role(parent, 0, False, ACC_EXEC_MASK)
