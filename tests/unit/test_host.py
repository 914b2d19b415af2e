"""Unit tests for kvmsplit/host.py (Model: the host mm behind guest memory; no kernel twin)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsplit.errors import HarnessError
from kvmsplit.host import HOST_PFN_BASE, HostMm
from kvmsplit.spte import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

SIZE_2M = KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) << PAGE_SHIFT
SIZE_1G = KVM_PAGES_PER_HPAGE(PG_LEVEL_1G) << PAGE_SHIFT
VMA_START = 4 * SIZE_1G

# (policy, VMA size, host page level): each VMA is big enough for its policy's page.
POLICIES = [("4k", 2 * SIZE_2M, PG_LEVEL_4K), ("thp", 2 * SIZE_2M, PG_LEVEL_2M), ("hugetlb-1g", SIZE_1G, PG_LEVEL_1G)]


def _mm(policy: str, size: int, start: int = VMA_START) -> HostMm:
    mm = HostMm()
    mm.add_vma(start, size, policy)
    return mm


def _page_offset(hva: int, level: int) -> int:
    return (hva >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1)


@pytest.mark.parametrize(("policy", "size", "level"), POLICIES)
def test_fault_maps_a_host_page_of_the_policy_size(policy: str, size: int, level: int) -> None:
    """host_pfn_mapping_level() reports the page hva_to_pfn() faulted in."""
    mm = _mm(policy, size)
    hva = VMA_START + 0x3000
    assert mm.host_mapping_level(hva) == PG_LEVEL_4K  # nothing populated yet
    pfn = mm.hva_to_pfn(hva)
    assert mm.host_mapping_level(hva) == level
    assert pfn >= HOST_PFN_BASE
    assert (pfn - _page_offset(hva, level)) % KVM_PAGES_PER_HPAGE(level) == 0


@pytest.mark.parametrize(("policy", "size", "level"), POLICIES)
@settings(max_examples=20)
@given(offsets=st.lists(st.integers(0, 2 * SIZE_2M - 1), min_size=1, max_size=8))
def test_every_pfn_is_aligned_to_its_host_page(policy: str, size: int, level: int, offsets: list[int]) -> None:
    """A 2 MiB host page has a 2 MiB aligned pfn, so KVM may map it with one huge SPTE."""
    mm = _mm(policy, size)
    for offset in offsets:
        hva = VMA_START + offset % size
        pfn = mm.hva_to_pfn(hva)
        host_level = mm.host_mapping_level(hva)
        assert host_level == level
        assert (pfn - _page_offset(hva, host_level)) % KVM_PAGES_PER_HPAGE(host_level) == 0


@pytest.mark.parametrize(("policy", "size", "level"), POLICIES[1:])
def test_hvas_in_one_huge_host_page_get_consecutive_pfns(policy: str, size: int, level: int) -> None:
    mm = _mm(policy, size)
    base = mm.hva_to_pfn(VMA_START)
    assert mm.hva_to_pfn(VMA_START + 0x5000) == base + 5
    assert mm.hva_to_pfn(VMA_START) == base


def test_distinct_host_pages_get_distinct_pfns() -> None:
    mm = _mm("4k", SIZE_2M)
    pfns = {mm.hva_to_pfn(VMA_START + i * 4096) for i in range(64)}
    assert len(pfns) == 64


def test_thp_frame_that_sticks_out_of_the_vma_falls_back_to_4k() -> None:
    """A huge page needs its whole aligned frame inside the VMA."""
    mm = _mm("thp", 2 * SIZE_2M, start=VMA_START + 0x1000)
    mm.hva_to_pfn(VMA_START + 0x1000)
    assert mm.host_mapping_level(VMA_START + 0x1000) == PG_LEVEL_4K
    mm.hva_to_pfn(VMA_START + SIZE_2M)
    assert mm.host_mapping_level(VMA_START + SIZE_2M) == PG_LEVEL_2M


def test_split_huge_keeps_every_pfn_and_drops_to_4k() -> None:
    """A THP split changes the host page size, not the memory behind it."""
    mm = _mm("thp", 2 * SIZE_2M)
    before = [mm.hva_to_pfn(VMA_START + i * 4096) for i in range(512)]
    changed = mm.split_huge(VMA_START + 0x7000)
    assert changed == (VMA_START, VMA_START + SIZE_2M)
    assert mm.host_mapping_level(VMA_START) == PG_LEVEL_4K
    assert [mm.hva_to_pfn(VMA_START + i * 4096) for i in range(512)] == before


def test_split_huge_of_a_4k_or_unpopulated_page_changes_nothing() -> None:
    mm = _mm("4k", SIZE_2M)
    assert mm.split_huge(VMA_START) is None
    mm.hva_to_pfn(VMA_START)
    assert mm.split_huge(VMA_START) is None


def test_collapse_moves_the_frame_to_a_new_huge_page() -> None:
    """MADV_COLLAPSE copies into a freshly allocated huge page, so the pfns change."""
    mm = _mm("thp", 2 * SIZE_2M)
    old = mm.hva_to_pfn(VMA_START + 0x2000)
    mm.split_huge(VMA_START)
    changed = mm.collapse(VMA_START + 0x2000)
    assert changed == (VMA_START, VMA_START + SIZE_2M)
    assert mm.host_mapping_level(VMA_START + 0x2000) == PG_LEVEL_2M
    new = mm.hva_to_pfn(VMA_START + 0x2000)
    assert new != old
    assert (new - 2) % KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) == 0


def test_collapse_of_a_huge_page_or_a_4k_vma_changes_nothing() -> None:
    mm = _mm("thp", 2 * SIZE_2M)
    mm.hva_to_pfn(VMA_START)
    assert mm.collapse(VMA_START) is None
    assert _mm("4k", SIZE_2M).collapse(VMA_START) is None


def test_free_drops_the_pages_and_a_refault_gets_new_pfns() -> None:
    """MADV_DONTNEED: the next access faults in fresh memory."""
    mm = _mm("4k", SIZE_2M)
    old = mm.hva_to_pfn(VMA_START)
    assert mm.free(VMA_START, VMA_START + 4096) == (VMA_START, VMA_START + 4096)
    assert list(mm.populated_ranges()) == []
    assert mm.hva_to_pfn(VMA_START) != old


def test_partial_free_of_a_huge_page_keeps_the_rest_as_4k_with_the_same_pfns() -> None:
    mm = _mm("thp", 2 * SIZE_2M)
    base = mm.hva_to_pfn(VMA_START)
    mm.free(VMA_START, VMA_START + 4096)
    populated = sorted(mm.populated_ranges())
    assert (PG_LEVEL_4K, VMA_START, 4096) not in populated
    assert len(populated) == 511
    assert all(level == PG_LEVEL_4K for level, _, _ in populated)
    assert mm.hva_to_pfn(VMA_START + 0x5000) == base + 5


def test_free_of_a_whole_huge_page_drops_it() -> None:
    mm = _mm("hugetlb-1g", SIZE_1G)
    mm.hva_to_pfn(VMA_START)
    mm.free(VMA_START, VMA_START + SIZE_1G)
    assert list(mm.populated_ranges()) == []


@pytest.mark.parametrize(
    ("start", "size", "policy", "match"),
    [
        (VMA_START + 1, SIZE_2M, "thp", "not page aligned"),
        (VMA_START, SIZE_2M + 1, "thp", "not page aligned"),
        (VMA_START, 0, "4k", "not page aligned"),
        (VMA_START, SIZE_2M, "hugetlb-512g", "policy"),
    ],
)
def test_bad_vma_is_a_harness_error(start: int, size: int, policy: str, match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        HostMm().add_vma(start, size, policy)


@pytest.mark.parametrize("start", [VMA_START, VMA_START + SIZE_2M - 4096, VMA_START - 4096])
def test_overlapping_vma_is_a_harness_error(start: int) -> None:
    mm = _mm("thp", SIZE_2M)
    with pytest.raises(HarnessError, match="overlaps"):
        mm.add_vma(start, 2 * 4096, "4k")
    assert len(mm.vmas) == 1


def test_adjacent_vmas_are_fine() -> None:
    mm = _mm("thp", SIZE_2M)
    mm.add_vma(VMA_START + SIZE_2M, SIZE_2M, "4k")
    assert mm.find_vma(VMA_START + SIZE_2M).policy == "4k"  # type: ignore[union-attr]


def test_fault_outside_every_vma_is_a_harness_error() -> None:
    mm = _mm("4k", SIZE_2M)
    with pytest.raises(HarnessError, match="no host VMA"):
        mm.hva_to_pfn(VMA_START + SIZE_2M)
