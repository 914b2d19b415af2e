"""Preconditions and specs the Z3 queries state, and the objects the split code runs on.

Each predicate here is plain and declarative, written from the kernel's
description rather than from the model's code, so a query proves the model
against a simpler statement.  Constants are imported from kvmsplit, never
retyped.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from kvmsplit.properties.smt import sym

from kvmsplit.kvm import Kvm, KvmConfig
from kvmsplit.mmu_page import KvmMmuPage
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    EPT_MASKS,
    KVM_PAGES_PER_HPAGE,
    NON_EPT_MASKS,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_ENABLED,
    SPTE_TDP_AD_MASK,
    SPTE_TDP_AD_WRPROT_ONLY,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    SpteMasks,
    _not,
    is_access_track_spte,
    spte_to_pfn,
)

SAVED_BITS = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
SAVED_R = VMX_EPT_READABLE_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
SAVED_X = VMX_EPT_EXECUTABLE_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT


def masks_of(case: dict[str, int]) -> SpteMasks:
    """The mask set a case names: ept=1 is kvm_mmu_set_ept_masks(), ept=0 kvm_mmu_reset_all_pte_masks()."""
    return EPT_MASKS if case["ept"] else NON_EPT_MASKS


def leaf_spte_well_formed(m: SpteMasks, spte: Any) -> Any:
    """The shape KVM keeps every leaf SPTE in, beyond its writable triad.

    - The A/D type is one make_spte() writes: with EPT enabled, disabled or
      write-protect-only; without EPT always enabled (shadow paging and NPT
      have hardware A/D bits, and only PML asks for write-protect-only).
    - The access-tracking save area (bits 54 and 56) is zero unless the SPTE
      is access-tracked (mark_spte_for_access_track() WARNs otherwise).
    """
    ad_type = spte & SPTE_TDP_AD_MASK
    if not m.ept:
        return sym.conj(ad_type == SPTE_TDP_AD_ENABLED, (spte & SAVED_BITS) == 0)
    ad_ok = sym.disj(
        ad_type == SPTE_TDP_AD_ENABLED, ad_type == SPTE_TDP_AD_DISABLED, ad_type == SPTE_TDP_AD_WRPROT_ONLY
    )
    return sym.conj(ad_ok, sym.implies(_not(is_access_track_spte(m, spte)), (spte & SAVED_BITS) == 0))


def huge_spte_ok(m: SpteMasks, huge_spte: Any, level: int) -> list[Any]:
    """A present huge leaf at @level: shadow-present, PS, pfn aligned to its size, well formed."""
    return [
        (huge_spte & SPTE_MMU_PRESENT_MASK) != 0,
        (huge_spte & PT_PAGE_SIZE_MASK) != 0,
        (spte_to_pfn(huge_spte) & (KVM_PAGES_PER_HPAGE(level) - 1)) == 0,
        leaf_spte_well_formed(m, huge_spte),
    ]


def child_pfn(huge_spte: Any, child_level: int, index: Any) -> Any:
    """The pfn entry @index of the table replacing @huge_spte must map."""
    return spte_to_pfn(huge_spte) + index * KVM_PAGES_PER_HPAGE(child_level)


def is_present_leaf(spte: Any, level: int) -> Any:
    """Shadow-present and a leaf: always at 4K, with PS above."""
    present = (spte & SPTE_MMU_PRESENT_MASK) != 0
    if level == PG_LEVEL_4K:
        return present
    return sym.conj(present, (spte & PT_PAGE_SIZE_MASK) != 0)


def is_present_nonleaf(spte: Any, level: int) -> Any:
    if level == PG_LEVEL_4K:
        return False
    return sym.conj((spte & SPTE_MMU_PRESENT_MASK) != 0, (spte & PT_PAGE_SIZE_MASK) == 0)


def inherited_mask(m: SpteMasks) -> int:
    """Bits a split child copies from its huge SPTE whatever its level and access.

    W, MMU-writable, Host-writable, user, A, D, memtype, the A/D type,
    MMU-present, the hardware present bit, and the saved R bit of an
    access-tracked SPTE.  PS, the pfn and the exec state are specified apart.
    """
    return (
        PT_WRITABLE_MASK
        | m.shadow_mmu_writable_mask
        | m.shadow_host_writable_mask
        | m.shadow_user_mask
        | m.shadow_accessed_mask
        | m.shadow_dirty_mask
        | m.shadow_memtype_mask
        | SPTE_TDP_AD_MASK
        | SPTE_MMU_PRESENT_MASK
        | m.shadow_present_mask
        | SAVED_R
    )


def exec_mask(m: SpteMasks) -> int:
    """Bits holding the exec state: X or NX, and the saved X bit of an access-tracked SPTE."""
    return m.shadow_x_mask | m.shadow_nx_mask | SAVED_X


@cache
def model_kvm(ept: bool, nx_huge_pages: bool) -> Kvm:
    """Model: a VM whose masks and NX mitigation are what a split asks of `kvm`."""
    kvm = Kvm.create(KvmConfig.named("tdp" if ept else "shadow"))
    kvm.nx_huge_pages = nx_huge_pages
    return kvm


def split_child_sp(child_level: int, access: int, gfn: Any = 0, tdp_mmu_page: bool = False) -> KvmMmuPage:
    """The direct child page a split fills.

    For the shadow MMU, the page shadow_mmu_get_sp_for_split() asks for
    (guest_mode: only nested MMUs split); for the TDP MMU, the page
    tdp_mmu_init_child_sp() sets up (the parent's role one level down).
    """
    role = KvmMmuPageRole(level=child_level, direct=True, access=access, guest_mode=not tdp_mmu_page)
    return KvmMmuPage(role=role, gfn=gfn, pfn=0, tdp_mmu_page=tdp_mmu_page)
