"""Unit tests for kvmsplit/tlb.py (Model: per-vCPU TLBs and paging-structure caches)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsplit.spte import ACC_ALL, ACC_USER_MASK, KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from kvmsplit.tlb import TLB_LEAF_ENTRIES, TLB_WALK_ENTRIES, TlbEntry, VcpuTlb

CTX = "root_mmu"
MiB = 1 << 20


def entry(level: int = PG_LEVEL_4K, pfn: int = 0x100000, access: int = ACC_ALL, dirty: bool = False) -> TlbEntry:
    return TlbEntry(level, pfn, access, dirty)


def test_an_empty_tlb_translates_nothing() -> None:
    """Model: a fresh VcpuTlb caches nothing."""
    tlb = VcpuTlb()
    assert tlb.lookup(CTX, 0x1000) is None
    assert tlb.translate(CTX, 0x1000) is None


def test_a_4k_entry_translates_its_page_only() -> None:
    """Model: a 4K leaf covers addresses with the same page number, nothing else."""
    tlb = VcpuTlb()
    e = entry(pfn=0x123456, access=ACC_USER_MASK, dirty=True)
    tlb.fill(CTX, 0x5123, e, [])
    assert tlb.lookup(CTX, 0x5000) is e and tlb.lookup(CTX, 0x5FFF) is e
    assert tlb.translate(CTX, 0x5ABC) == (0x123456, ACC_USER_MASK, True)
    assert tlb.lookup(CTX, 0x6000) is None and tlb.lookup(CTX, 0x4FFF) is None


@settings(max_examples=50)
@given(
    level=st.sampled_from((PG_LEVEL_2M, PG_LEVEL_1G)),
    frame=st.integers(0, 1 << 10),
    offset=st.integers(0, (1 << 30) - 1),
)
def test_a_huge_entry_translates_every_page_it_covers_with_the_offset_added(
    level: int, frame: int, offset: int
) -> None:
    """Model: translate() adds the page offset inside a 2M or 1G leaf to its base pfn."""
    tlb = VcpuTlb()
    n = KVM_PAGES_PER_HPAGE(level)
    size = n << PAGE_SHIFT
    base = frame * size
    offset %= size
    pfn = 0x4000000
    tlb.fill(CTX, base, entry(level, pfn), [])
    assert tlb.translate(CTX, base + offset) == (pfn + (offset >> PAGE_SHIFT), ACC_ALL, False)
    assert tlb.lookup(CTX, base + size) is None


def test_entries_are_per_context() -> None:
    """An L2 address in guest_mmu and an L1 gpa in root_mmu never alias."""
    tlb = VcpuTlb()
    tlb.fill(CTX, 0x1000, entry(pfn=1), [])
    tlb.fill("guest_mmu", 0x1000, entry(pfn=2), [])
    assert tlb.translate(CTX, 0x1000)[0] == 1
    assert tlb.translate("guest_mmu", 0x1000)[0] == 2
    tlb.flush_context("guest_mmu")
    assert tlb.lookup("guest_mmu", 0x1000) is None
    assert tlb.lookup(CTX, 0x1000) is not None


def test_flush_all_drops_leaves_and_walks() -> None:
    """Model: flush_all() is what kvm_flush_remote_tlbs() does to each vCPU."""
    tlb = VcpuTlb()
    tlb.fill(CTX, 0x1000, entry(), [(4, 0x100000000), (3, 0x100000001)])
    assert len(tlb.walks) == 2
    tlb.flush_all()
    assert not tlb.leaves and not tlb.walks


def test_refilling_an_address_replaces_its_entry() -> None:
    """Model: one entry per (context, level, frame); a refill overwrites it."""
    tlb = VcpuTlb()
    tlb.fill(CTX, 0x1000, entry(pfn=1), [])
    tlb.fill(CTX, 0x1000, entry(pfn=2, dirty=True), [])
    assert len(tlb.leaves) == 1
    assert tlb.translate(CTX, 0x1000) == (2, ACC_ALL, True)


def test_the_leaf_cache_holds_at_most_tlb_leaf_entries_and_evicts_the_oldest() -> None:
    """Model: at most TLB_LEAF_ENTRIES leaves; the oldest fill is evicted first."""
    tlb = VcpuTlb()
    for i in range(TLB_LEAF_ENTRIES + 1):
        tlb.fill(CTX, i << PAGE_SHIFT, entry(pfn=0x1000 + i), [])
    assert len(tlb.leaves) == TLB_LEAF_ENTRIES
    assert tlb.lookup(CTX, 0) is None
    assert tlb.translate(CTX, 1 << PAGE_SHIFT)[0] == 0x1001
    assert tlb.translate(CTX, TLB_LEAF_ENTRIES << PAGE_SHIFT)[0] == 0x1000 + TLB_LEAF_ENTRIES


def test_a_refilled_entry_becomes_the_newest_and_survives_eviction() -> None:
    """Model: a refill moves the entry to the newest end of the eviction order."""
    tlb = VcpuTlb()
    for i in range(TLB_LEAF_ENTRIES):
        tlb.fill(CTX, i << PAGE_SHIFT, entry(pfn=0x1000 + i), [])
    tlb.fill(CTX, 0, entry(pfn=0x1000), [])
    tlb.fill(CTX, TLB_LEAF_ENTRIES << PAGE_SHIFT, entry(), [])
    assert tlb.lookup(CTX, 0) is not None
    assert tlb.lookup(CTX, 1 << PAGE_SHIFT) is None


def test_the_walk_cache_holds_at_most_tlb_walk_entries() -> None:
    """Model: at most TLB_WALK_ENTRIES paging-structure entries, oldest evicted first."""
    tlb = VcpuTlb()
    for i in range(TLB_WALK_ENTRIES + 5):
        tlb.fill(CTX, i * 2 * MiB, entry(), [(2, 0x100000000 + i)])
    assert len(tlb.walks) == TLB_WALK_ENTRIES
    # Oldest first: the first five level-2 walk entries are gone.
    assert (CTX, 2, 0) not in tlb.walks and (CTX, 2, TLB_WALK_ENTRIES + 4) in tlb.walks


def test_lookup_prefers_the_smallest_page_when_sizes_overlap() -> None:
    """Model: a 4K entry and a stale 2M entry for the same address: the 4K one is found first."""
    tlb = VcpuTlb()
    tlb.fill(CTX, 0, entry(PG_LEVEL_2M, 0x200000), [])
    tlb.fill(CTX, 0x3000, entry(PG_LEVEL_4K, 0x999999), [])
    assert tlb.translate(CTX, 0x3000)[0] == 0x999999
    assert tlb.translate(CTX, 0x4000)[0] == 0x200004
