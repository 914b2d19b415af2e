"""struct kvm_mmu_page and the page hash, mirroring arch/x86/kvm/mmu/mmu_internal.h and mmu.c.

`spt` and `shadowed_translation` are flat arrays of 512 unsigned 64-bit ints
(array('Q')), never 512 objects.  A shadow page's own host frame number
(`pfn`, the kernel's __pa(sp->spt) >> PAGE_SHIFT) comes from a model
allocator and is what a non-leaf SPTE points at.
"""

from __future__ import annotations

from array import array

import attrs

from kvmsplit.errors import kvm_bug_on
from kvmsplit.rmap import KvmRmapHead, Sptep
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import ACC_ALL, KVM_HPAGE_GFN_SHIFT, PAGE_SHIFT, SPTE_ENT_PER_PAGE

KVM_MMU_HASH_SHIFT = 12
KVM_NUM_MMU_PAGES = 1 << KVM_MMU_HASH_SHIFT
GOLDEN_RATIO_64 = 0x61C8864680B583EB

_ZERO_PAGE = bytes(8 * SPTE_ENT_PER_PAGE)


def hash_64(val: int, bits: int) -> int:
    """include/linux/hash.h hash_64() (the generic multiplicative hash)."""
    return ((val * GOLDEN_RATIO_64) & ((1 << 64) - 1)) >> (64 - bits)


def new_table() -> array:
    """A zeroed 512-entry page table."""
    return array("Q", _ZERO_PAGE)


@attrs.define(eq=False, repr=False)
class KvmMmuPage:
    """struct kvm_mmu_page; compares by identity, like a kernel pointer."""

    role: KvmMmuPageRole
    gfn: int
    pfn: int
    spt: array = attrs.field(factory=new_table)
    shadowed_translation: array | None = None
    tdp_mmu_page: bool = False
    unsync: bool = False
    unsync_children: int = 0
    unsync_child_bitmap: int = 0
    parent_ptes: KvmRmapHead = attrs.field(factory=KvmRmapHead)
    # TDP MMU pages have one parent SPTE instead of parent_ptes (the union's ptep).
    ptep: Sptep | None = None
    root_count: int = 0
    nx_huge_page_disallowed: bool = False
    possible_nx_huge_page: bool = False
    mmu_valid_gen: int = 0
    write_flooding_count: int = 0
    # TDP: kvm_tdp_mmu_invalidate_all_roots() marks roots to zap.
    tdp_mmu_scheduled_root_to_zap: bool = False
    # Model: allocation order, for stable printing and active-list checks.
    model_seq: int = 0

    def __repr__(self) -> str:
        kind = "tdp" if self.tdp_mmu_page else "shadow"
        flags = ""
        if self.unsync:
            flags += " unsync"
        if self.root_count:
            flags += f" root_count={self.root_count}"
        return f"sp({kind} gfn={self.gfn:#x} {self.role!r} pfn={self.pfn:#x}{flags})"


def sp_has_gptes(sp: KvmMmuPage) -> bool:
    """Does @sp shadow a guest page table (mmu.c sp_has_gptes())?"""
    return not sp.role.direct and not sp.role.passthrough


def sp_ad_disabled(sp: KvmMmuPage) -> bool:
    return sp.role.ad_disabled


def kvm_mmu_page_get_gfn(sp: KvmMmuPage, index: int) -> int:
    """The gfn entry @index of @sp maps (mmu.c)."""
    if sp.role.passthrough:
        return sp.gfn
    if not sp.role.direct:
        assert sp.shadowed_translation is not None
        return sp.shadowed_translation[index] >> PAGE_SHIFT
    return sp.gfn + (index << KVM_HPAGE_GFN_SHIFT(sp.role.level))


def kvm_mmu_page_get_access(sp: KvmMmuPage, index: int) -> int:
    """The ACC_* rights the guest grants through entry @index (mmu.c)."""
    if sp_has_gptes(sp):
        assert sp.shadowed_translation is not None
        return sp.shadowed_translation[index] & ACC_ALL
    # A direct page under an indirect MMU holds the guest huge page's access
    # in its role; for a direct MMU that is ACC_ALL.
    return sp.role.access


def kvm_mmu_page_set_translation(sp: KvmMmuPage, index: int, gfn: int, access: int) -> None:
    """Record what entry @index maps (mmu.c); direct pages only check it."""
    if sp_has_gptes(sp):
        assert sp.shadowed_translation is not None
        sp.shadowed_translation[index] = (gfn << PAGE_SHIFT) | access
        return
    if access != kvm_mmu_page_get_access(sp, index):
        kvm_bug_on(
            True,
            "kvm_mmu_page_set_translation",
            f"access mismatch under {'direct' if sp.role.direct else 'passthrough'} page "
            f"(sp gfn {sp.gfn:#x}, index {index}): cached {kvm_mmu_page_get_access(sp, index)}, computed {access}",
        )
    if gfn != kvm_mmu_page_get_gfn(sp, index):
        kvm_bug_on(
            True,
            "kvm_mmu_page_set_translation",
            f"gfn mismatch under direct page {sp.gfn:#x} (expected {kvm_mmu_page_get_gfn(sp, index):#x}, got {gfn:#x})",
        )


def kvm_mmu_page_set_access(sp: KvmMmuPage, index: int, access: int) -> None:
    gfn = kvm_mmu_page_get_gfn(sp, index)
    kvm_mmu_page_set_translation(sp, index, gfn, access)


def kvm_mmu_child_role(parent: KvmMmuPage, index: int, direct: bool, access: int) -> KvmMmuPageRole:
    """Role of the page linked at entry @index of @parent (mmu.c kvm_mmu_child_role())."""
    role = parent.role.evolve(level=parent.role.level - 1, access=access, direct=direct, passthrough=False)
    if role.has_4_byte_gpte:
        kvm_bug_on(role.level != 1, "kvm_mmu_child_role", "4-byte gptes above 4K")
        role = role.evolve(quadrant=index & 1)
    return role
