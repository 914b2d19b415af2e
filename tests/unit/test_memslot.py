"""Unit tests for kvmsplit/memslot.py (struct kvm_memory_slot, lpage_info, the dirty bitmap)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsplit.errors import HarnessError, KvmBugOn
from kvmsplit.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KvmMemorySlot,
    dirty_bitmap_gfns,
    gfn_round_for_level,
    gfn_to_index,
    gfn_to_rmap,
    kvm_dirty_bitmap_bytes,
    kvm_mmu_gfn_allow_lpage,
    kvm_mmu_gfn_disallow_lpage,
    lpage_disallowed,
    mark_page_dirty_in_slot,
    rmap_head_release,
    update_gfn_disallow_lpage_count,
)
from kvmsplit.spte import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from tests.strategies import huge_levels, levels, memslots

gfns = st.integers(0, 1 << 40)
PAGES_2M = KVM_PAGES_PER_HPAGE(PG_LEVEL_2M)
PAGES_1G = KVM_PAGES_PER_HPAGE(PG_LEVEL_1G)


def _slot(base_gfn: int, npages: int, ugfn: int | None = None, flags: int = 0) -> KvmMemorySlot:
    ugfn = base_gfn if ugfn is None else ugfn
    slot = KvmMemorySlot(id=1, base_gfn=base_gfn, npages=npages, userspace_addr=ugfn << PAGE_SHIFT, flags=flags)
    if flags & KVM_MEM_LOG_DIRTY_PAGES:
        slot.dirty_bitmap = bytearray(kvm_dirty_bitmap_bytes(slot))
    return slot


# --- gfn_to_index() and gfn_round_for_level(). --------------------------------------


@settings(max_examples=100)
@given(gfn=gfns, level=levels)
def test_gfn_round_for_level_is_the_start_of_the_enclosing_frame(gfn: int, level: int) -> None:
    pages = KVM_PAGES_PER_HPAGE(level)
    rounded = gfn_round_for_level(gfn, level)
    assert rounded % pages == 0
    assert rounded <= gfn < rounded + pages


@settings(max_examples=100)
@given(base_gfn=gfns, offset=st.integers(0, 4 * PAGES_1G), level=levels)
def test_gfn_to_index_counts_frames_from_the_slot_base(base_gfn: int, offset: int, level: int) -> None:
    """gfn_to_index() indexes rmap and lpage_info by frame, the slot's first (partial) frame at 0."""
    gfn = base_gfn + offset
    pages = KVM_PAGES_PER_HPAGE(level)
    frames = (gfn_round_for_level(gfn, level) - gfn_round_for_level(base_gfn, level)) // pages
    assert gfn_to_index(gfn, base_gfn, level) == frames
    assert gfn_to_index(base_gfn, base_gfn, level) == 0


def test_gfn_to_index_at_4k_is_the_page_offset() -> None:
    assert gfn_to_index(0x1234, 0x1000, PG_LEVEL_4K) == 0x234


# --- lpage_info (kvm_alloc_memslot_metadata(), update_gfn_disallow_lpage_count()). -----


def _spec_disallowed(slot: KvmMemorySlot, gfn: int, level: int) -> bool:
    """A frame may be mapped huge only if it lies wholly in the slot and gfn and hva agree mod its size."""
    pages = KVM_PAGES_PER_HPAGE(level)
    frame = gfn_round_for_level(gfn, level)
    inside = slot.base_gfn <= frame and frame + pages <= slot.base_gfn + slot.npages
    congruent = (slot.base_gfn - (slot.userspace_addr >> PAGE_SHIFT)) % pages == 0
    return not (inside and congruent)


@settings(max_examples=150)
@given(slot=memslots(), level=huge_levels, data=st.data())
def test_lpage_disallowed_matches_the_frame_and_congruence_rule(
    slot: KvmMemorySlot, level: int, data: st.DataObject
) -> None:
    gfn = data.draw(st.integers(slot.base_gfn, slot.base_gfn + slot.npages - 1))
    assert bool(lpage_disallowed(slot, gfn, level)) == _spec_disallowed(slot, gfn, level)


def test_lpage_disallowed_at_unaligned_slot_edges_only() -> None:
    """kvm_alloc_memslot_metadata() marks linfo[0] and linfo[lpages - 1] when the edges are unaligned."""
    slot = _slot(base_gfn=0x100, npages=0x400)  # [0x100, 0x500): both edges mid-2M
    assert lpage_disallowed(slot, 0x100, PG_LEVEL_2M)
    assert lpage_disallowed(slot, 0x1FF, PG_LEVEL_2M)
    assert not lpage_disallowed(slot, 0x200, PG_LEVEL_2M)
    assert not lpage_disallowed(slot, 0x3FF, PG_LEVEL_2M)
    assert lpage_disallowed(slot, 0x400, PG_LEVEL_2M)
    assert lpage_disallowed(slot, 0x4FF, PG_LEVEL_2M)


def test_lpage_disallowed_everywhere_when_gfn_and_hva_are_incongruent() -> None:
    """kvm_alloc_memslot_metadata(): (base_gfn ^ ugfn) & (pages - 1) disallows every frame at that level."""
    slot = _slot(base_gfn=0, npages=4 * PAGES_2M, ugfn=1)
    for gfn in range(0, 4 * PAGES_2M, PAGES_2M):
        assert lpage_disallowed(slot, gfn, PG_LEVEL_2M)


def test_lpage_congruent_at_2m_but_not_1g_disallows_only_1g() -> None:
    slot = _slot(base_gfn=0, npages=2 * PAGES_1G, ugfn=PAGES_2M)
    assert not lpage_disallowed(slot, PAGES_1G, PG_LEVEL_2M)
    assert lpage_disallowed(slot, PAGES_1G, PG_LEVEL_1G)


def test_lpage_slot_inside_one_frame_disallows_it() -> None:
    slot = _slot(base_gfn=0, npages=PAGES_2M - 1)
    assert lpage_disallowed(slot, 0, PG_LEVEL_2M)


def test_disallow_lpage_bumps_both_huge_levels_for_the_frames_holding_the_gfn() -> None:
    """kvm_mmu_gfn_disallow_lpage() from account_shadowed() keeps the gfn out of huge mappings."""
    slot = _slot(base_gfn=0, npages=2 * PAGES_1G)
    gfn = PAGES_2M + 5
    kvm_mmu_gfn_disallow_lpage(slot, gfn)
    assert lpage_disallowed(slot, gfn, PG_LEVEL_2M) == 1
    assert lpage_disallowed(slot, gfn, PG_LEVEL_1G) == 1
    # The same 2M frame, and the same 1G frame through a different 2M frame.
    assert lpage_disallowed(slot, PAGES_2M, PG_LEVEL_2M) == 1
    assert lpage_disallowed(slot, 0, PG_LEVEL_2M) == 0
    assert lpage_disallowed(slot, 0, PG_LEVEL_1G) == 1
    assert lpage_disallowed(slot, PAGES_1G, PG_LEVEL_1G) == 0
    kvm_mmu_gfn_disallow_lpage(slot, gfn + 1)
    assert lpage_disallowed(slot, gfn, PG_LEVEL_2M) == 2


@settings(max_examples=50)
@given(slot=memslots(max_frames=2), data=st.data())
def test_allow_lpage_undoes_disallow_lpage(slot: KvmMemorySlot, data: st.DataObject) -> None:
    gfn = data.draw(st.integers(slot.base_gfn, slot.base_gfn + slot.npages - 1))
    before = [lpage_disallowed(slot, gfn, level) for level in (PG_LEVEL_2M, PG_LEVEL_1G)]
    kvm_mmu_gfn_disallow_lpage(slot, gfn)
    kvm_mmu_gfn_allow_lpage(slot, gfn)
    assert [lpage_disallowed(slot, gfn, level) for level in (PG_LEVEL_2M, PG_LEVEL_1G)] == before
    assert slot.lpage_info == [{}, {}]


def test_allow_lpage_below_zero_is_a_bug() -> None:
    """update_gfn_disallow_lpage_count() WARNs when the count would flip KVM_LPAGE_MIXED_FLAG."""
    slot = _slot(base_gfn=0, npages=PAGES_1G)
    with pytest.raises(KvmBugOn) as excinfo:
        update_gfn_disallow_lpage_count(slot, 0, -1)
    assert excinfo.value.site == "update_gfn_disallow_lpage_count"


# --- rmap heads (gfn_to_rmap()). -------------------------------------------------------


def test_gfn_to_rmap_creates_a_head_only_on_request_and_release_drops_an_empty_one() -> None:
    slot = _slot(base_gfn=0x1000, npages=PAGES_1G)
    assert gfn_to_rmap(0x1234, PG_LEVEL_2M, slot) is None
    head = gfn_to_rmap(0x1234, PG_LEVEL_2M, slot, create=True)
    assert head is not None
    # Every gfn of the same 2M frame shares the head.
    assert gfn_to_rmap(0x1200, PG_LEVEL_2M, slot) is head
    assert gfn_to_rmap(0x1400, PG_LEVEL_2M, slot) is None
    rmap_head_release(0x1234, PG_LEVEL_2M, slot)
    assert gfn_to_rmap(0x1234, PG_LEVEL_2M, slot) is None


@settings(max_examples=50)
@given(slot=memslots(max_frames=1), data=st.data())
def test_gfn_to_hva_and_back_round_trip(slot: KvmMemorySlot, data: st.DataObject) -> None:
    """__gfn_to_hva_memslot(): userspace_addr + (gfn - base_gfn) * PAGE_SIZE."""
    gfn = data.draw(st.integers(slot.base_gfn, slot.base_gfn + slot.npages - 1))
    hva = slot.gfn_to_hva(gfn)
    assert hva == slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
    assert slot.hva_to_gfn(hva + 0xFFF) == gfn


# --- The dirty bitmap (mark_page_dirty_in_slot()). ------------------------------------


@pytest.mark.parametrize(("npages", "nbytes"), [(1, 8), (64, 8), (65, 16), (512, 64)])
def test_dirty_bitmap_is_sized_in_whole_longs(npages: int, nbytes: int) -> None:
    """kvm_dirty_bitmap_bytes(): ALIGN(npages, BITS_PER_LONG) / 8."""
    assert kvm_dirty_bitmap_bytes(_slot(0, npages)) == nbytes


def test_mark_page_dirty_sets_the_little_endian_bit_for_the_slot_relative_gfn() -> None:
    """mark_page_dirty_in_slot() uses set_bit_le(gfn - base_gfn)."""
    slot = _slot(base_gfn=0x1000, npages=128, flags=KVM_MEM_LOG_DIRTY_PAGES)
    mark_page_dirty_in_slot(slot, 0x1000 + 11)
    assert slot.dirty_bitmap is not None
    assert slot.dirty_bitmap[1] == 1 << 3
    assert sum(slot.dirty_bitmap) == 1 << 3
    assert dirty_bitmap_gfns(slot) == [0x1000 + 11]


@settings(max_examples=50)
@given(data=st.data(), npages=st.integers(1, 300), base_gfn=st.integers(0, 1 << 30))
def test_dirty_bitmap_gfns_lists_every_marked_gfn_once_in_order(
    data: st.DataObject, npages: int, base_gfn: int
) -> None:
    slot = _slot(base_gfn=base_gfn, npages=npages, flags=KVM_MEM_LOG_DIRTY_PAGES)
    marked = data.draw(st.lists(st.integers(base_gfn, base_gfn + npages - 1), max_size=40))
    for gfn in marked:
        mark_page_dirty_in_slot(slot, gfn)
    assert dirty_bitmap_gfns(slot) == sorted(set(marked))


def test_mark_page_dirty_is_a_no_op_without_dirty_logging() -> None:
    slot = _slot(base_gfn=0, npages=64)
    slot.dirty_bitmap = bytearray(kvm_dirty_bitmap_bytes(slot))
    mark_page_dirty_in_slot(slot, 5)
    mark_page_dirty_in_slot(None, 5)
    assert dirty_bitmap_gfns(slot) == []


def test_mark_page_dirty_outside_the_slot_is_a_harness_error() -> None:
    slot = _slot(base_gfn=0x100, npages=64, flags=KVM_MEM_LOG_DIRTY_PAGES)
    with pytest.raises(HarnessError, match="0x140"):
        mark_page_dirty_in_slot(slot, 0x140)


def test_dirty_bitmap_gfns_reads_a_given_snapshot_instead_of_the_slot() -> None:
    """The model reads a KVM_GET_DIRTY_LOG copy the same way as the live bitmap."""
    slot = _slot(base_gfn=0x10, npages=64, flags=KVM_MEM_LOG_DIRTY_PAGES)
    snapshot = bytearray(8)
    snapshot[0] = 0b1000_0001
    assert dirty_bitmap_gfns(slot, snapshot) == [0x10, 0x17]
    assert dirty_bitmap_gfns(slot) == []
