"""SPTE bit layout and construction, mirroring arch/x86/kvm/mmu/spte.h and spte.c.

SPTEs are bare 64-bit values, as in KVM.  Every bit helper here uses only
``& | ~ << * == !=`` and branches only on concrete arguments (a level, a mask
set), so the Z3 queries can pass a 64-bit ``z3.BitVec`` where an int goes and
prove facts about the very code the state machines run.  Right shifts and
boolean connectives go through the small `_lshr`, `_and`, `_or`, `_not`,
`_if` shims below, which pick the Python or the Z3 operator by argument type.

KVM picks its masks once at module load (kvm_mmu_reset_all_pte_masks() for
shadow paging and NPT, kvm_mmu_set_ept_masks() for EPT).  Model: the masks are
an explicit `SpteMasks` value instead of module globals, so both layouts can
live in one process; the `NON_EPT_MASKS` and `EPT_MASKS` instances hold the
values those two functions set.
"""

from __future__ import annotations

from typing import Any

import attrs

from kvmsplit.errors import kvm_bug_on

# Spte is an int in the state machines and a z3 BitVecRef in the proofs.
Spte = Any

# Geometry, arch/x86/include/asm/kvm_host.h and mmu_internal.h.
PAGE_SHIFT = 12
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PG_LEVEL_512G = 4
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
KVM_NR_PAGE_SIZES = 3
PT64_ROOT_4LEVEL = 4
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 512
PT64_ENT_PER_PAGE = SPTE_ENT_PER_PAGE

# Permission encoding used in roles and shadowed_translation (spte.h).
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# Architectural bits shared by both layouts.
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
PT64_NX_MASK = 1 << 63

# Software bits (spte.h).
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT
DEFAULT_SPTE_HOST_WRITABLE = 1 << 9
DEFAULT_SPTE_MMU_WRITABLE = 1 << 10
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58

# Access tracking saves EPT R and X here (spte.h).
SHADOW_ACC_TRACK_SAVED_BITS_MASK = 0x5  # VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54

# EPT bits (arch/x86/include/asm/vmx.h).
VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_MT_MASK = 7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
MTRR_TYPE_WRBACK = 6

# SPTE_BASE_ADDR_MASK is bits 12..51 (no CONFIG_DYNAMIC_PHYSICAL_MASK).
# Model: the host has 46 physical address bits (so the non-EPT MMIO value
# may use reserved bit 51, as kvm_mmu_reset_all_pte_masks() does when
# shadow_phys_bits < 52) and no memory encryption (shadow_me_value is 0).
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
MODEL_HOST_PHYS_BITS = 46
MODEL_MAX_PFN = 1 << (MODEL_HOST_PHYS_BITS - PAGE_SHIFT)

# The value a TDP MMU thread holding mmu_lock for read writes while it owns an
# SPTE (B: REMOVED_SPTE; newer kernels call it FROZEN_SPTE).
REMOVED_SPTE = 0x5A0
FROZEN_SPTE = REMOVED_SPTE

# MMIO generation layout (spte.h).
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1
MMIO_SPTE_GEN_LOW_MASK = ((1 << (MMIO_SPTE_GEN_LOW_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_LOW_START) - 1)
MMIO_SPTE_GEN_HIGH_MASK = ((1 << (MMIO_SPTE_GEN_HIGH_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_HIGH_START) - 1)
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1

U64_MASK = (1 << 64) - 1


def KVM_HPAGE_GFN_SHIFT(level: int) -> int:
    return (level - 1) * SPTE_LEVEL_BITS


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    return 1 << KVM_HPAGE_GFN_SHIFT(level)


def PAGE_SIZE_FOR_LEVEL(level: int) -> int:
    """Model: bytes mapped by one SPTE at @level (KVM_HPAGE_SIZE())."""
    return KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT


# --- Z3 shims: Python operators on ints, Z3 operators on bit-vectors. -------


def _is_int(x: Any) -> bool:
    return isinstance(x, int)


def _lshr(x: Spte, n: int) -> Spte:
    if _is_int(x):
        return x >> n
    import z3

    return z3.LShR(x, n)


def _and(a: Any, b: Any) -> Any:
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    import z3

    return z3.And(a, b)


def _or(a: Any, b: Any) -> Any:
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    import z3

    return z3.Or(a, b)


def _not(a: Any) -> Any:
    if isinstance(a, bool):
        return not a
    import z3

    return z3.Not(a)


def _if(cond: Any, then: Any, other: Any) -> Any:
    if isinstance(cond, bool):
        return then if cond else other
    import z3

    return z3.If(cond, then, other)


# --- Mask sets. -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SpteMasks:
    """The shadow_*_mask globals KVM sets at module load (spte.c)."""

    name: str
    shadow_present_mask: int
    shadow_user_mask: int
    shadow_accessed_mask: int
    shadow_dirty_mask: int
    shadow_nx_mask: int
    shadow_x_mask: int
    shadow_acc_track_mask: int
    shadow_host_writable_mask: int
    shadow_mmu_writable_mask: int
    shadow_memtype_mask: int
    shadow_memtype_value: int
    shadow_mmio_value: int
    shadow_mmio_mask: int
    shadow_mmio_access_mask: int

    @property
    def ept(self) -> bool:
        return self.name == "ept"


def kvm_mmu_reset_all_pte_masks() -> SpteMasks:
    """Masks for shadow paging and NPT (spte.c kvm_mmu_reset_all_pte_masks())."""
    # Model: MAXPHYADDR < 52, so MMIO SPTEs set reserved bit 51 plus P and a
    # guest access takes a reserved-bit #PF.
    mmio = (1 << 51) | PT_PRESENT_MASK
    return SpteMasks(
        name="non-ept",
        shadow_present_mask=PT_PRESENT_MASK,
        shadow_user_mask=PT_USER_MASK,
        shadow_accessed_mask=PT_ACCESSED_MASK,
        shadow_dirty_mask=PT_DIRTY_MASK,
        shadow_nx_mask=PT64_NX_MASK,
        shadow_x_mask=0,
        shadow_acc_track_mask=0,
        shadow_host_writable_mask=DEFAULT_SPTE_HOST_WRITABLE,
        shadow_mmu_writable_mask=DEFAULT_SPTE_MMU_WRITABLE,
        shadow_memtype_mask=0,
        shadow_memtype_value=0,
        shadow_mmio_value=mmio,
        shadow_mmio_mask=mmio,
        shadow_mmio_access_mask=ACC_WRITE_MASK | ACC_USER_MASK,
    )


def kvm_mmu_set_ept_masks(has_ad_bits: bool = True, has_exec_only: bool = False) -> SpteMasks:
    """Masks for EPT (spte.c kvm_mmu_set_ept_masks())."""
    return SpteMasks(
        name="ept" if has_ad_bits else "ept-no-ad",
        shadow_present_mask=0 if has_exec_only else VMX_EPT_READABLE_MASK,
        shadow_user_mask=VMX_EPT_READABLE_MASK,
        shadow_accessed_mask=VMX_EPT_ACCESS_BIT if has_ad_bits else 0,
        shadow_dirty_mask=VMX_EPT_DIRTY_BIT if has_ad_bits else 0,
        shadow_nx_mask=0,
        shadow_x_mask=VMX_EPT_EXECUTABLE_MASK,
        shadow_acc_track_mask=VMX_EPT_RWX_MASK,
        shadow_host_writable_mask=EPT_SPTE_HOST_WRITABLE,
        shadow_mmu_writable_mask=EPT_SPTE_MMU_WRITABLE,
        shadow_memtype_mask=VMX_EPT_MT_MASK | VMX_EPT_IPAT_BIT,
        # vmx_get_mt_mask() for RAM without non-coherent DMA: WB with IPAT.
        shadow_memtype_value=(MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT,
        shadow_mmio_value=VMX_EPT_MISCONFIG_WX_VALUE,
        shadow_mmio_mask=VMX_EPT_RWX_MASK,
        shadow_mmio_access_mask=0,
    )


NON_EPT_MASKS = kvm_mmu_reset_all_pte_masks()
EPT_MASKS = kvm_mmu_set_ept_masks()


# --- Predicates (spte.h). ----------------------------------------------------


def is_shadow_present_pte(spte: Spte) -> Any:
    return (spte & SPTE_MMU_PRESENT_MASK) != 0


def is_removed_spte(spte: Spte) -> Any:
    return spte == REMOVED_SPTE


is_frozen_spte = is_removed_spte


def is_large_pte(spte: Spte) -> Any:
    return (spte & PT_PAGE_SIZE_MASK) != 0


def is_last_spte(spte: Spte, level: int) -> Any:
    """Leaf test; like the kernel it does not test presence."""
    if level == PG_LEVEL_4K:
        return True
    return is_large_pte(spte)


def is_writable_pte(spte: Spte) -> Any:
    return (spte & PT_WRITABLE_MASK) != 0


def spte_to_pfn(spte: Spte) -> Spte:
    return _lshr(spte & SPTE_BASE_ADDR_MASK, PAGE_SHIFT)


def is_mmu_writable_spte(m: SpteMasks, spte: Spte) -> Any:
    return (spte & m.shadow_mmu_writable_mask) != 0


def is_host_writable_spte(m: SpteMasks, spte: Spte) -> Any:
    """Model name for the inline test of shadow_host_writable_mask."""
    return (spte & m.shadow_host_writable_mask) != 0


def is_executable_pte(m: SpteMasks, spte: Spte) -> Any:
    return (spte & (m.shadow_x_mask | m.shadow_nx_mask)) == m.shadow_x_mask


def spte_ad_enabled(spte: Spte) -> Any:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def spte_ad_need_write_protect(spte: Spte) -> Any:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED


def spte_shadow_accessed_mask(m: SpteMasks, spte: Spte) -> Spte:
    return _if(spte_ad_enabled(spte), _const(spte, m.shadow_accessed_mask), _const(spte, 0))


def spte_shadow_dirty_mask(m: SpteMasks, spte: Spte) -> Spte:
    return _if(spte_ad_enabled(spte), _const(spte, m.shadow_dirty_mask), _const(spte, 0))


def _const(like: Spte, value: int) -> Spte:
    if _is_int(like):
        return value
    import z3

    return z3.BitVecVal(value, like.size())


def is_access_track_spte(m: SpteMasks, spte: Spte) -> Any:
    return _and(_not(spte_ad_enabled(spte)), (spte & m.shadow_acc_track_mask) == 0)


def is_accessed_spte(m: SpteMasks, spte: Spte) -> Any:
    """B semantics: the A bit when A/D is enabled, else not access-tracked."""
    return _if(
        spte_ad_enabled(spte),
        (spte & m.shadow_accessed_mask) != 0,
        _not(is_access_track_spte(m, spte)),
    )


def is_dirty_spte(m: SpteMasks, spte: Spte) -> Any:
    """B semantics: the D bit when A/D is enabled, else W."""
    return _if(
        _and(spte_ad_enabled(spte), m.shadow_dirty_mask != 0),
        (spte & m.shadow_dirty_mask) != 0,
        (spte & PT_WRITABLE_MASK) != 0,
    )


def is_mmio_spte(m: SpteMasks, spte: Spte) -> Any:
    if m.shadow_mmio_value == 0:
        return False
    return (spte & m.shadow_mmio_mask) == m.shadow_mmio_value


def check_spte_writable_invariants(m: SpteMasks, spte: Spte) -> None:
    """WARN if W is set without MMU-writable, or MMU-writable without Host-writable."""
    if not _is_int(spte):
        return
    if spte & m.shadow_mmu_writable_mask:
        kvm_bug_on(
            not (spte & m.shadow_host_writable_mask),
            "check_spte_writable_invariants",
            lambda: f"MMU-writable SPTE is not Host-writable: {spte:#x}",
        )
    else:
        kvm_bug_on(
            bool(spte & PT_WRITABLE_MASK),
            "check_spte_writable_invariants",
            lambda: f"Writable SPTE is not MMU-writable: {spte:#x}",
        )


def spte_writable_triad_holds(m: SpteMasks, spte: Spte) -> Any:
    """Model: check_spte_writable_invariants() as a predicate, for proofs."""
    w = (spte & PT_WRITABLE_MASK) != 0
    mmu_w = (spte & m.shadow_mmu_writable_mask) != 0
    host_w = (spte & m.shadow_host_writable_mask) != 0
    return _and(_or(_not(w), mmu_w), _or(_not(mmu_w), host_w))


def spte_has_volatile_bits(m: SpteMasks, spte: int) -> bool:
    """Can @spte change outside mmu_lock (spte.c spte_has_volatile_bits())?"""
    if not is_writable_pte(spte) and is_mmu_writable_spte(m, spte):
        return True
    if is_access_track_spte(m, spte):
        return True
    if spte_ad_enabled(spte):
        if not (spte & m.shadow_accessed_mask) or (is_writable_pte(spte) and not (spte & m.shadow_dirty_mask)):
            return True
    return False


# --- Construction (spte.c). --------------------------------------------------


def mark_spte_for_access_track(m: SpteMasks, spte: Spte) -> Spte:
    """Make @spte fault on the next access so KVM can see it was used."""
    if _is_int(spte):
        if spte_ad_enabled(spte):
            return spte & ~m.shadow_accessed_mask
        if is_access_track_spte(m, spte):
            return spte
        check_spte_writable_invariants(m, spte)
        saved = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
        kvm_bug_on(
            bool(spte & saved),
            "mark_spte_for_access_track",
            lambda: f"Access Tracking saved bit locations are not zero: {spte:#x}",
        )
        spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
        return spte & ~m.shadow_acc_track_mask
    # Symbolic form of the same three cases.
    cleared_a = spte & ~_const(spte, m.shadow_accessed_mask)
    tracked = (spte | ((spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)) & ~_const(
        spte, m.shadow_acc_track_mask
    )
    return _if(
        spte_ad_enabled(spte),
        cleared_a,
        _if(is_access_track_spte(m, spte), spte, tracked),
    )


def restore_acc_track_spte(m: SpteMasks, spte: Spte) -> Spte:
    """Undo mark_spte_for_access_track() for an A/D-disabled SPTE (spte.h)."""
    saved_bits = _lshr(spte, SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte = spte & ~_const(spte, m.shadow_acc_track_mask)
    spte = spte & ~_const(spte, SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved_bits


def make_spte_executable(m: SpteMasks, spte: Spte) -> Spte:
    """Grant exec, preserving access-tracking state (spte.c)."""
    if _is_int(spte):
        is_access_track = is_access_track_spte(m, spte)
        if is_access_track:
            spte = restore_acc_track_spte(m, spte)
        spte = (spte & ~m.shadow_nx_mask) | m.shadow_x_mask
        if is_access_track:
            spte = mark_spte_for_access_track(m, spte)
        return spte
    tracked = is_access_track_spte(m, spte)
    restored = _if(tracked, restore_acc_track_spte(m, spte), spte)
    exe = (restored & ~_const(spte, m.shadow_nx_mask)) | m.shadow_x_mask
    return _if(tracked, mark_spte_for_access_track(m, exe), exe)


def make_nonleaf_spte(m: SpteMasks, child_pfn: Spte, ad_disabled: bool) -> Spte:
    """Point at the page table @child_pfn, granting every access (spte.c)."""
    spte = SPTE_MMU_PRESENT_MASK
    spte = (child_pfn << PAGE_SHIFT) | spte
    spte |= m.shadow_present_mask | PT_WRITABLE_MASK | m.shadow_user_mask | m.shadow_x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= m.shadow_accessed_mask
    return spte


def generation_mmio_spte_mask(gen: Spte) -> Spte:
    if _is_int(gen):
        kvm_bug_on(gen & ~MMIO_SPTE_GEN_MASK != 0, "generation_mmio_spte_mask", lambda: f"gen {gen:#x}")
    mask = (gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


def get_mmio_spte_generation(spte: Spte) -> Spte:
    gen = _lshr(spte & MMIO_SPTE_GEN_LOW_MASK, MMIO_SPTE_GEN_LOW_SHIFT)
    gen |= _lshr(spte & MMIO_SPTE_GEN_HIGH_MASK, MMIO_SPTE_GEN_HIGH_SHIFT)
    return gen


def make_mmio_spte(m: SpteMasks, generation: Spte, gfn: Spte, access: int) -> Spte:
    """Cache an MMIO gfn in a non-present SPTE (spte.c make_mmio_spte()).

    Model: no L1TF relocation of high gpa bits (shadow_nonpresent_or_rsvd_mask
    is 0), which is the case on hosts without the L1TF bug.
    """
    kvm_bug_on(m.shadow_mmio_value == 0, "make_mmio_spte", "MMIO caching is disabled")
    spte = generation_mmio_spte_mask(generation & MMIO_SPTE_GEN_MASK)
    access &= m.shadow_mmio_access_mask
    spte |= m.shadow_mmio_value | access
    spte |= gfn << PAGE_SHIFT
    return spte


def get_mmio_spte_gfn(spte: Spte) -> Spte:
    return _lshr(spte & SPTE_BASE_ADDR_MASK & ~(1 << 51), PAGE_SHIFT)


def make_huge_page_split_spte(
    m: SpteMasks, huge_spte: Spte, child_level: int, child_access: int, index: Spte, nx_huge_page_enabled: bool
) -> Spte:
    """Return entry @index of the page table that replaces @huge_spte.

    Mirrors spte.c make_huge_page_split_spte(kvm, huge_spte, role, index)
    (make_small_spte() in newer kernels); @child_level and @child_access are
    the child role's level and access, @nx_huge_page_enabled is
    is_nx_huge_page_enabled(kvm).
    """
    if _is_int(huge_spte):
        if not is_shadow_present_pte(huge_spte):
            kvm_bug_on(True, "make_huge_page_split_spte", f"not present: {huge_spte:#x}")
        if not is_large_pte(huge_spte):
            kvm_bug_on(True, "make_huge_page_split_spte", f"not large: {huge_spte:#x}")
    # OR is enough: a huge SPTE's pfn is aligned to its size.
    child_spte = huge_spte | ((index * KVM_PAGES_PER_HPAGE(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        child_spte = child_spte & ~_const(child_spte, PT_PAGE_SIZE_MASK)
        # The NX huge page mitigation applies only above 4K: give back the
        # exec right make_spte() took from the huge SPTE.
        if (child_access & ACC_EXEC_MASK) and nx_huge_page_enabled:
            child_spte = make_spte_executable(m, child_spte)
    return child_spte


def spte_access(m: SpteMasks, spte: int) -> int:
    """Model: the ACC_* rights a present leaf grants the guest right now.

    Used by the TLB model and the invariants, not by KVM: W from the W bit,
    user from shadow_user_mask, exec from is_executable_pte().  An
    access-tracked EPT SPTE grants nothing until restored.
    """
    if m.shadow_acc_track_mask and is_access_track_spte(m, spte):
        return 0
    access = 0
    if spte & PT_WRITABLE_MASK:
        access |= ACC_WRITE_MASK
    if spte & m.shadow_user_mask:
        access |= ACC_USER_MASK
    if is_executable_pte(m, spte):
        access |= ACC_EXEC_MASK
    return access


def kvm_mmu_page_ad_need_write_protect(kvm: Any, sp: Any) -> bool:
    """mmu_internal.h: with PML, L2's dirty pages must be caught by write faults."""
    return bool(kvm.config.cpu_dirty_log_size) and sp.role.guest_mode


def make_spte(
    kvm: Any,
    sp: Any,
    slot: Any,
    pte_access: int,
    gfn: int,
    pfn: int,
    old_spte: int,
    prefetch: bool,
    synchronizing: bool,
    host_writable: bool,
) -> tuple[bool, int]:
    """Build a leaf SPTE; return (wrprot, new_spte) (spte.c make_spte(), baseline B).

    wrprot is true when the guest asked for write access but KVM had to map
    the page read-only because the gfn holds a shadowed guest page table.
    @synchronizing is B's !can_unsync: FNAME(sync_spte) passes prefetch=true,
    can_unsync=false, so a resynced SPTE starts access-tracked (newer kernels
    mark it accessed instead).
    """
    from kvmsplit import shadow_mmu
    from kvmsplit.memslot import kvm_slot_dirty_track_enabled, mark_page_dirty_in_slot

    m: SpteMasks = kvm.masks
    level = sp.role.level
    spte = SPTE_MMU_PRESENT_MASK
    wrprot = False
    kvm_bug_on(not pte_access and not m.shadow_present_mask, "make_spte", "no access and no present mask")
    if sp.role.ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    elif kvm_mmu_page_ad_need_write_protect(kvm, sp):
        spte |= SPTE_TDP_AD_WRPROT_ONLY
    spte |= m.shadow_present_mask
    if not prefetch:
        spte |= spte_shadow_accessed_mask(m, spte)
    # The NX huge page mitigation: huge pages are never executable.
    if level > PG_LEVEL_4K and (pte_access & ACC_EXEC_MASK) and kvm.is_nx_huge_page_enabled():
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= m.shadow_x_mask
    else:
        spte |= m.shadow_nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= m.shadow_user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if m.shadow_memtype_mask:
        spte |= m.shadow_memtype_value
    if host_writable:
        spte |= m.shadow_host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    # A symbolic @pfn (the Z3 queries) carries this range as an assumption.
    if _is_int(pfn):
        kvm_bug_on(
            not 0 <= pfn < MODEL_MAX_PFN,
            "make_spte",
            lambda: f"pfn {pfn:#x} is outside the host's physical address space",
        )
    spte |= pfn << PAGE_SHIFT
    skip_dirty = False
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | m.shadow_mmu_writable_mask
        # An already writable leaf needs no unsync check and keeps its D bit.
        if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and is_writable_pte(old_spte):
            skip_dirty = True
        elif shadow_mmu.mmu_try_to_unsync_pages(kvm, slot, gfn, synchronizing, prefetch):
            wrprot = True
            pte_access &= ~ACC_WRITE_MASK
            spte &= ~(PT_WRITABLE_MASK | m.shadow_mmu_writable_mask)
    if not skip_dirty and pte_access & ACC_WRITE_MASK:
        spte |= spte_shadow_dirty_mask(m, spte)
    if prefetch:
        spte = mark_spte_for_access_track(m, spte)
    # The slot test comes first so a symbolic SPTE with no slot is never
    # tested for truth.
    if kvm_slot_dirty_track_enabled(slot) and is_writable_pte(spte):
        # kvm_mmu_hugepage_adjust() keeps dirty-logged slots at 4K.
        kvm_bug_on(level > PG_LEVEL_4K, "make_spte", lambda: f"writable level-{level} SPTE in dirty-logged {slot!r}")
        mark_page_dirty_in_slot(slot, gfn)
    return wrprot, spte
