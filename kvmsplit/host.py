"""Model: the host mm behind guest memory (no kernel twin in arch/x86/kvm).

KVM asks the host two things about an hva: which pfn backs it
(hva_to_pfn()) and how big the host page holding it is
(host_pfn_mapping_level(), a walk of the host page tables).  This module
answers both and tells KVM's MMU notifier when the answer changes: a THP
split, a collapse, or a free (MADV_DONTNEED).

Model: a VMA has a policy ('4k', 'thp' or 'hugetlb-1g'); host pages are
populated on first use, and pfns come from a bump allocator, aligned to the
page size, so a 2 MiB host page has a 2 MiB aligned pfn as on real hardware.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from kvmsplit.errors import HarnessError
from kvmsplit.spte import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

HOST_POLICIES = {"4k": PG_LEVEL_4K, "thp": PG_LEVEL_2M, "hugetlb-2m": PG_LEVEL_2M, "hugetlb-1g": PG_LEVEL_1G}

# Model: host physical memory starts at 4 GiB, away from the shadow page pool.
HOST_PFN_BASE = 1 << 20


@attrs.define(eq=False)
class HostVma:
    start: int
    end: int
    policy: str

    @property
    def max_level(self) -> int:
        return HOST_POLICIES[self.policy]


@attrs.define(eq=False)
class HostMm:
    """Populated host pages: for each level, page index -> base pfn."""

    vmas: list[HostVma] = attrs.field(factory=list)
    pages: dict[int, dict[int, int]] = attrs.field(factory=lambda: {1: {}, 2: {}, 3: {}})
    next_pfn: int = HOST_PFN_BASE

    def add_vma(self, start: int, size: int, policy: str) -> HostVma:
        if policy not in HOST_POLICIES:
            raise HarnessError(f"host backing policy {policy!r} is not one of {sorted(HOST_POLICIES)}")
        if start % 4096 or size % 4096 or size <= 0:
            raise HarnessError(f"host VMA at hva {start:#x} size {size:#x} is not page aligned")
        align = {"hugetlb-2m": 1 << 21, "hugetlb-1g": 1 << 30}.get(policy, 4096)
        if start % align or size % align:
            raise HarnessError(f"host VMA at hva {start:#x} size {size:#x} is not aligned to its {policy} pages")
        for v in self.vmas:
            if start < v.end and v.start < start + size:
                raise HarnessError(f"host VMA at hva {start:#x} overlaps the VMA at {v.start:#x}")
        vma = HostVma(start, start + size, policy)
        self.vmas.append(vma)
        return vma

    def find_vma(self, hva: int) -> HostVma | None:
        for v in self.vmas:
            if v.start <= hva < v.end:
                return v
        return None

    def _lookup(self, hva: int) -> tuple[int, int] | None:
        """(level, base pfn) of the populated host page holding @hva."""
        page = hva >> PAGE_SHIFT
        for level in (PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K):
            idx = page >> ((level - 1) * 9)
            base = self.pages[level].get(idx)
            if base is not None:
                return level, base
        return None

    def _alloc(self, level: int) -> int:
        n = KVM_PAGES_PER_HPAGE(level)
        pfn = (self.next_pfn + n - 1) & ~(n - 1)
        self.next_pfn = pfn + n
        return pfn

    def hva_to_pfn(self, hva: int) -> int:
        """Fault in and return the pfn backing @hva (hva_to_pfn(), get_user_pages())."""
        found = self._lookup(hva)
        if found is None:
            vma = self.find_vma(hva)
            if vma is None:
                raise HarnessError(f"hva {hva:#x} is in no host VMA")
            level = vma.max_level
            # A huge page needs its whole aligned frame inside the VMA and
            # none of it populated with smaller pages.
            while level > PG_LEVEL_4K:
                size = KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT
                frame = hva & ~(size - 1)
                if frame >= vma.start and frame + size <= vma.end and not self._any_populated(frame, size):
                    break
                level -= 1
            idx = (hva >> PAGE_SHIFT) >> ((level - 1) * 9)
            self.pages[level][idx] = self._alloc(level)
            found = (level, self.pages[level][idx])
        level, base = found
        offset = (hva >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1)
        return base + offset

    def _any_populated(self, start: int, size: int) -> bool:
        first = start >> PAGE_SHIFT
        last = (start + size - 1) >> PAGE_SHIFT
        for level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
            shift = (level - 1) * 9
            lo, hi = first >> shift, last >> shift
            d = self.pages[level]
            if hi - lo < len(d):
                if any(i in d for i in range(lo, hi + 1)):
                    return True
            elif any(lo <= i <= hi for i in d):
                return True
        return False

    def host_mapping_level(self, hva: int) -> int:
        """host_pfn_mapping_level(): the level of the host leaf, 4K if unpopulated."""
        found = self._lookup(hva)
        return found[0] if found else PG_LEVEL_4K

    def split_huge(self, hva: int) -> tuple[int, int] | None:
        """Split the huge host page at @hva into 4K pages with the same pfns.

        Returns the hva range whose mapping changed, for the MMU notifier.
        """
        found = self._lookup(hva)
        if found is None or found[0] == PG_LEVEL_4K:
            return None
        level, base = found
        n = KVM_PAGES_PER_HPAGE(level)
        first = ((hva >> PAGE_SHIFT) >> ((level - 1) * 9)) * n
        del self.pages[level][first // n]
        for i in range(n):
            self.pages[PG_LEVEL_4K][first + i] = base + i
        return first << PAGE_SHIFT, (first + n) << PAGE_SHIFT

    def collapse(self, hva: int) -> tuple[int, int] | None:
        """Collapse the 2M frame at @hva into a new huge page (MADV_COLLAPSE).

        The contents move to a freshly allocated huge page, so the pfns change.
        """
        vma = self.find_vma(hva)
        size = KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) << PAGE_SHIFT
        frame = hva & ~(size - 1)
        if vma is None or vma.max_level < PG_LEVEL_2M or frame < vma.start or frame + size > vma.end:
            return None
        found = self._lookup(hva)
        if found is not None and found[0] >= PG_LEVEL_2M:
            return None
        first = frame >> PAGE_SHIFT
        for i in range(512):
            self.pages[PG_LEVEL_4K].pop(first + i, None)
        self.pages[PG_LEVEL_2M][first >> 9] = self._alloc(PG_LEVEL_2M)
        return frame, frame + size

    def free(self, start: int, end: int) -> tuple[int, int]:
        """MADV_DONTNEED: drop every host page overlapping [start, end)."""
        for level in (PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K):
            shift = (level - 1) * 9 + PAGE_SHIFT
            d = self.pages[level]
            lo, hi = start >> shift, (end - 1) >> shift
            for idx in [i for i in d if lo <= i <= hi]:
                base = d.pop(idx)
                if level > PG_LEVEL_4K:
                    # A partial free splits the huge page and keeps the rest.
                    n = KVM_PAGES_PER_HPAGE(level)
                    for i in range(n):
                        page = idx * n + i
                        if not start >> PAGE_SHIFT <= page < (end + 4095) >> PAGE_SHIFT:
                            self.pages[PG_LEVEL_4K][page] = base + i
        return start, end

    def populated_ranges(self) -> Iterator[tuple[int, int, int]]:
        for level, d in self.pages.items():
            for idx in d:
                size = KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT
                yield level, idx * size, size
