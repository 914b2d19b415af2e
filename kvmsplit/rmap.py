"""kvm_rmap_head and pte_list_desc, mirroring the pte_list_*() code in arch/x86/kvm/mmu/mmu.c.

An rmap head is empty, holds one SPTE pointer, or points at a chain of
`PteListDesc` of up to PTE_LIST_EXT (14) entries.  New entries go into the
head descriptor; a full head gets a new head in front of it, so tail
descriptors are always full.  The same structure holds a shadow page's
parent_ptes.

Model: the kernel tags the pointer's bit 0 to tell a single SPTE from a
descriptor; here `val` is None, a `Sptep`, or a `PteListDesc`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Union

import attrs

from kvmsplit.errors import kvm_bug_on

if TYPE_CHECKING:
    from kvmsplit.mmu_page import KvmMmuPage

PTE_LIST_EXT = 14
RMAP_RECYCLE_THRESHOLD = 1000


@attrs.frozen(repr=False)
class Sptep:
    """A pointer to entry @index of @sp's page table (u64 *sptep)."""

    # KvmMmuPage compares by identity, so equality here is pointer equality.
    sp: KvmMmuPage
    index: int

    @property
    def spte(self) -> int:
        return self.sp.spt[self.index]

    def __repr__(self) -> str:
        return f"sptep(sp@{self.sp.pfn:#x}[{self.index}] L{self.sp.role.level} gfn={self.sp.gfn:#x})"


@attrs.define(eq=False)
class PteListDesc:
    """struct pte_list_desc."""

    more: PteListDesc | None = None
    spte_count: int = 0
    tail_count: int = 0
    sptes: list[Sptep | None] = attrs.field(factory=lambda: [None] * PTE_LIST_EXT)


RmapVal = Union[None, Sptep, PteListDesc]


@attrs.define
class KvmMmuMemoryCache:
    """struct kvm_mmu_memory_cache: preallocated objects, counted."""

    name: str
    capacity: int
    nobjs: int = 0

    def alloc(self, site: str) -> None:
        # An empty cache means a missing top-up (kvm_mmu_memory_cache_alloc() WARNs).
        kvm_bug_on(self.nobjs <= 0, site, lambda: f"{self.name} is empty")
        self.nobjs -= 1


@attrs.define(eq=False, slots=True)
class KvmRmapHead:
    """struct kvm_rmap_head."""

    val: RmapVal = None

    def __bool__(self) -> bool:  # the kernel tests rmap_head->val
        return self.val is not None


def pte_list_add(sptep: Sptep, rmap_head: KvmRmapHead, cache: KvmMmuMemoryCache | None = None) -> int:
    """Add @sptep; return the number of entries that were there before.

    A new descriptor comes from @cache when given (kvm_mmu_memory_cache_alloc()).
    """
    val = rmap_head.val
    if val is None:
        rmap_head.val = sptep
        return 0
    if isinstance(val, Sptep):
        if cache is not None:
            cache.alloc("pte_list_add")
        desc = PteListDesc()
        desc.sptes[0] = val
        desc.sptes[1] = sptep
        desc.spte_count = 2
        rmap_head.val = desc
        return 1
    desc = val
    count = desc.tail_count + desc.spte_count
    # Tail descriptors are kept full: a full head gets a new head in front.
    if desc.spte_count == PTE_LIST_EXT:
        if cache is not None:
            cache.alloc("pte_list_add")
        desc = PteListDesc(more=val, spte_count=0, tail_count=count)
        rmap_head.val = desc
    desc.sptes[desc.spte_count] = sptep
    desc.spte_count += 1
    return count


def _pte_list_desc_remove_entry(rmap_head: KvmRmapHead, desc: PteListDesc, i: int) -> None:
    head_desc = rmap_head.val
    assert isinstance(head_desc, PteListDesc)
    j = head_desc.spte_count - 1
    kvm_bug_on(j < 0, "pte_list_desc_remove_entry", "empty head descriptor")
    # Move the head's last entry into the hole so tails stay full.
    desc.sptes[i] = head_desc.sptes[j]
    head_desc.sptes[j] = None
    head_desc.spte_count -= 1
    if head_desc.spte_count:
        return
    rmap_head.val = head_desc.more


def pte_list_remove(sptep: Sptep, rmap_head: KvmRmapHead) -> None:
    """Remove @sptep; KVM_BUG_ON_DATA_CORRUPTION if it is not there."""
    val = rmap_head.val
    kvm_bug_on(val is None, "pte_list_remove", lambda: f"{sptep!r} removed from an empty rmap")
    if isinstance(val, Sptep):
        kvm_bug_on(val != sptep, "pte_list_remove", lambda: f"{sptep!r} is not in the rmap (holds {val!r})")
        rmap_head.val = None
        return
    desc = val
    while desc is not None:
        for i in range(desc.spte_count):
            if desc.sptes[i] == sptep:
                _pte_list_desc_remove_entry(rmap_head, desc, i)
                return
        desc = desc.more
    kvm_bug_on(True, "pte_list_remove", f"{sptep!r} is not in the rmap")


def pte_list_count(rmap_head: KvmRmapHead) -> int:
    val = rmap_head.val
    if val is None:
        return 0
    if isinstance(val, Sptep):
        return 1
    return val.tail_count + val.spte_count


def rmap_iter(rmap_head: KvmRmapHead) -> Iterator[Sptep]:
    """for_each_rmap_spte(): head descriptor first, then the tails.

    Callers that change an SPTE restart the walk (goto restart), as the
    kernel's do; the iterator reads the chain lazily like rmap_get_next().
    """
    val = rmap_head.val
    if val is None:
        return
    if isinstance(val, Sptep):
        yield val
        return
    desc: PteListDesc | None = val
    while desc is not None:
        for i in range(desc.spte_count):
            s = desc.sptes[i]
            assert s is not None
            yield s
        desc = desc.more


def rmap_first(rmap_head: KvmRmapHead) -> Sptep | None:
    """rmap_get_first()."""
    for sptep in rmap_iter(rmap_head):
        return sptep
    return None


def pte_list_desc_shape_ok(rmap_head: KvmRmapHead) -> str | None:
    """Model: describe what is wrong with the chain shape, or None if it is sound."""
    val = rmap_head.val
    if not isinstance(val, PteListDesc):
        return None
    if val.spte_count == 0:
        return "head descriptor is empty"
    expected_tail = 0
    desc = val.more
    tails = []
    while desc is not None:
        tails.append(desc)
        desc = desc.more
    for t in reversed(tails):
        if t.spte_count != PTE_LIST_EXT:
            return f"tail descriptor holds {t.spte_count} entries, not {PTE_LIST_EXT}"
        if t.tail_count != expected_tail:
            return f"tail_count {t.tail_count} != {expected_tail}"
        expected_tail += PTE_LIST_EXT
    if val.tail_count != expected_tail:
        return f"head tail_count {val.tail_count} != {expected_tail}"
    return None
