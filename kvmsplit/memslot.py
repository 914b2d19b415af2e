"""struct kvm_memory_slot with its x86 arch data, mirroring include/linux/kvm_host.h and arch/x86/kvm/x86.c.

A slot holds the rmaps per level, lpage_info (the disallow_lpage counts),
the write-tracking counts (gfn_write_track, page_track.c) and the dirty
bitmap.  Model: rmaps, lpage_info and gfn_write_track are sparse dicts
keyed by gfn_to_index(); an absent key is an empty rmap head or a zero
count.  The static part of disallow_lpage (unaligned slot edges, gfn/hva
incongruence set by kvm_alloc_memslot_metadata()) is computed, not stored.
"""

from __future__ import annotations

import attrs

from kvmsplit.errors import HarnessError, kvm_bug_on
from kvmsplit.rmap import KvmRmapHead
from kvmsplit.spte import (
    KVM_HPAGE_GFN_SHIFT,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_NR_PAGE_SIZES,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_2M,
)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_USER_MEM_SLOTS = 32764
KVM_MEMSLOT_INVALID = 1 << 16


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """arch/x86/include/asm/kvm_host.h gfn_to_index()."""
    shift = KVM_HPAGE_GFN_SHIFT(level)
    return (gfn >> shift) - (base_gfn >> shift)


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & -KVM_PAGES_PER_HPAGE(level)


@attrs.define(eq=False, repr=False)
class KvmMemorySlot:
    """struct kvm_memory_slot plus struct kvm_arch_memory_slot."""

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int = 0
    as_id: int = 0
    # rmap[level - 1]: gfn_to_index(gfn, base_gfn, level) -> head.
    rmap: list[dict[int, KvmRmapHead]] = attrs.field(factory=lambda: [{} for _ in range(KVM_NR_PAGE_SIZES)])
    # lpage_info[level - 2]: index -> dynamic disallow_lpage count.
    lpage_info: list[dict[int, int]] = attrs.field(factory=lambda: [{} for _ in range(KVM_NR_PAGE_SIZES - 1)])
    gfn_write_track: dict[int, int] = attrs.field(factory=dict)
    dirty_bitmap: bytearray | None = None
    # Model: gfns the guest wrote while logging was on and userspace has not
    # harvested since (what dirty_log_records_every_write checks).
    model_written: set[int] = attrs.field(factory=set)

    def __repr__(self) -> str:
        return (
            f"slot(id={self.id} gfn={self.base_gfn:#x}+{self.npages:#x} hva={self.userspace_addr:#x} "
            f"flags={self.flags:#x})"
        )

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """__gfn_to_hva_memslot()."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)


def kvm_slot_dirty_track_enabled(slot: KvmMemorySlot | None) -> bool:
    return slot is not None and bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)


def kvm_dirty_bitmap_bytes(slot: KvmMemorySlot) -> int:
    return ((slot.npages + 63) // 64) * 8


def _kvm_mmu_slot_lpages(slot: KvmMemorySlot, npages: int, level: int) -> int:
    return gfn_to_index(slot.base_gfn + npages - 1, slot.base_gfn, level) + 1


def lpage_static_disallow(slot: KvmMemorySlot, index: int, level: int) -> int:
    """The disallow_lpage that kvm_alloc_memslot_metadata() sets at slot creation."""
    mask = KVM_PAGES_PER_HPAGE(level) - 1
    ugfn = slot.userspace_addr >> PAGE_SHIFT
    if (slot.base_gfn ^ ugfn) & mask:
        return 1
    lpages = _kvm_mmu_slot_lpages(slot, slot.npages, level)
    if index == 0 and slot.base_gfn & mask:
        return 1
    if index == lpages - 1 and (slot.base_gfn + slot.npages) & mask:
        return 1
    return 0


def lpage_disallowed(slot: KvmMemorySlot, gfn: int, level: int) -> int:
    """lpage_info_slot(gfn, slot, level)->disallow_lpage."""
    index = gfn_to_index(gfn, slot.base_gfn, level)
    return lpage_static_disallow(slot, index, level) + slot.lpage_info[level - 2].get(index, 0)


def update_gfn_disallow_lpage_count(slot: KvmMemorySlot, gfn: int, count: int) -> None:
    """Adjust disallow_lpage for @gfn at every huge level (mmu.c)."""
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        d = slot.lpage_info[level - 2]
        index = gfn_to_index(gfn, slot.base_gfn, level)
        new = d.get(index, 0) + count
        kvm_bug_on(new < 0, "update_gfn_disallow_lpage_count", lambda: f"gfn {gfn:#x} count underflow")
        if new:
            d[index] = new
        else:
            d.pop(index, None)


def kvm_mmu_gfn_disallow_lpage(slot: KvmMemorySlot, gfn: int) -> None:
    update_gfn_disallow_lpage_count(slot, gfn, 1)


def kvm_mmu_gfn_allow_lpage(slot: KvmMemorySlot, gfn: int) -> None:
    update_gfn_disallow_lpage_count(slot, gfn, -1)


def gfn_to_rmap(gfn: int, level: int, slot: KvmMemorySlot, create: bool = False) -> KvmRmapHead | None:
    """mmu.c gfn_to_rmap(); Model: returns None for an empty head unless @create."""
    d = slot.rmap[level - 1]
    index = gfn_to_index(gfn, slot.base_gfn, level)
    head = d.get(index)
    if head is None and create:
        head = d[index] = KvmRmapHead()
    return head


def rmap_head_release(gfn: int, level: int, slot: KvmMemorySlot) -> None:
    """Model: drop an emptied head from the sparse rmap dict."""
    d = slot.rmap[level - 1]
    index = gfn_to_index(gfn, slot.base_gfn, level)
    head = d.get(index)
    if head is not None and head.val is None:
        del d[index]


def mark_page_dirty_in_slot(slot: KvmMemorySlot | None, gfn: int) -> None:
    """virt/kvm/kvm_main.c mark_page_dirty_in_slot() (dirty bitmap only)."""
    if slot is None or not kvm_slot_dirty_track_enabled(slot):
        return
    if not slot.contains(gfn):
        raise HarnessError(f"mark_page_dirty_in_slot: gfn {gfn:#x} outside {slot!r}")
    bitmap = slot.dirty_bitmap
    assert bitmap is not None
    rel = gfn - slot.base_gfn
    bitmap[rel >> 3] |= 1 << (rel & 7)


def dirty_bitmap_gfns(slot: KvmMemorySlot, bitmap: bytes | bytearray | None = None) -> list[int]:
    """Model: the gfns whose bits are set, in order."""
    bm = slot.dirty_bitmap if bitmap is None else bitmap
    if bm is None:
        return []
    out = []
    for byte_index, byte in enumerate(bm):
        if byte:
            for bit in range(8):
                if byte & (1 << bit):
                    out.append(slot.base_gfn + byte_index * 8 + bit)
    return out
