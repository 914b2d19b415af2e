"""Hypothesis strategies shared by the kvmsplit tests.

Each strategy draws a value KVM itself could hold: a present leaf SPTE with a
writable triad spte.h allows, a role within its bit-field widths, a memslot
KVM_SET_USER_MEMORY_REGION would accept.  Constants come from kvmsplit, never
retyped.
"""

from __future__ import annotations

from hypothesis import strategies as st

from kvmsplit.memslot import KvmMemorySlot
from kvmsplit.role import PT64_ROOT_MAX_LEVEL, KvmMmuPageRole
from kvmsplit.spte import (
    ACC_ALL,
    EPT_MASKS,
    KVM_HPAGE_GFN_SHIFT,
    KVM_PAGES_PER_HPAGE,
    MMIO_SPTE_GEN_MASK,
    NON_EPT_MASKS,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SpteMasks,
)

MASK_SETS = (NON_EPT_MASKS, EPT_MASKS)
mask_sets = st.sampled_from(MASK_SETS)

levels = st.sampled_from((PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G))
huge_levels = st.sampled_from((PG_LEVEL_2M, PG_LEVEL_1G))
acc_bits = st.integers(0, ACC_ALL)
spte_indexes = st.integers(0, SPTE_ENT_PER_PAGE - 1)
mmio_generations = st.integers(0, MMIO_SPTE_GEN_MASK)

# SPTE_BASE_ADDR_MASK holds 40-bit pfns; the bit helpers take any of them.
MAX_PFN = SPTE_BASE_ADDR_MASK >> PAGE_SHIFT
pfns = st.integers(0, MAX_PFN)

# (Host-writable, MMU-writable, W) as spte.h lists them above is_writable_pte().
VALID_WRITABLE_TRIADS = ((1, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 0))
INVALID_WRITABLE_TRIADS = ((0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 1))


def aligned_pfns(level: int, max_pfn: int = MAX_PFN) -> st.SearchStrategy[int]:
    """pfns aligned to the size of a @level page, as a huge SPTE's pfn is."""
    shift = KVM_HPAGE_GFN_SHIFT(level)
    return st.integers(0, (max_pfn - 1) >> shift).map(lambda n: n << shift)


def host_aligned_pfns(level: int) -> st.SearchStrategy[int]:
    """pfns the model's host can hand to make_spte() (MODEL_HOST_PHYS_BITS)."""
    from kvmsplit.spte import MODEL_MAX_PFN

    return aligned_pfns(level, MODEL_MAX_PFN)


def triad_bits(m: SpteMasks, triad: tuple[int, int, int]) -> int:
    """The SPTE bits for a (Host-writable, MMU-writable, W) triple under @m."""
    host_w, mmu_w, w = triad
    return (
        (m.shadow_host_writable_mask if host_w else 0)
        | (m.shadow_mmu_writable_mask if mmu_w else 0)
        | (PT_WRITABLE_MASK if w else 0)
    )


@st.composite
def leaf_sptes(draw: st.DrawFn, m: SpteMasks, level: int, *, ad_disabled: bool = False) -> int:
    """A shadow-present leaf SPTE at @level, laid out as make_spte() lays one out.

    @ad_disabled gives an SPTE of an A/D-disabled page (SPTE_TDP_AD_DISABLED,
    no A or D bits), which only the EPT layout uses.
    """
    spte = SPTE_MMU_PRESENT_MASK | m.shadow_present_mask
    spte |= draw(aligned_pfns(level)) << PAGE_SHIFT
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if draw(st.booleans()):
        spte |= m.shadow_user_mask
    spte |= m.shadow_x_mask if draw(st.booleans()) else m.shadow_nx_mask
    spte |= triad_bits(m, draw(st.sampled_from(VALID_WRITABLE_TRIADS)))
    spte |= m.shadow_memtype_value
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        if draw(st.booleans()):
            spte |= m.shadow_accessed_mask
        if draw(st.booleans()):
            spte |= m.shadow_dirty_mask
    return spte


@st.composite
def masks_and_huge_sptes(draw: st.DrawFn) -> tuple[SpteMasks, int, int]:
    """(masks, level, huge SPTE) for a present huge leaf under either layout."""
    m = draw(mask_sets)
    level = draw(huge_levels)
    return m, level, draw(leaf_sptes(m, level))


roles = st.builds(
    KvmMmuPageRole,
    level=st.integers(1, PT64_ROOT_MAX_LEVEL),
    has_4_byte_gpte=st.booleans(),
    quadrant=st.integers(0, 3),
    direct=st.booleans(),
    access=acc_bits,
    invalid=st.booleans(),
    efer_nx=st.booleans(),
    cr0_wp=st.booleans(),
    smep_andnot_wp=st.booleans(),
    smap_andnot_wp=st.booleans(),
    ad_disabled=st.booleans(),
    guest_mode=st.booleans(),
    passthrough=st.booleans(),
    smm=st.integers(0, 255),
)


@st.composite
def memslots(draw: st.DrawFn, max_frames: int = 3) -> KvmMemorySlot:
    """A memslot spanning up to @max_frames 1 GiB frames, edges and hva drawn freely.

    Both edges may sit anywhere, so unaligned edges and gfn/hva incongruence
    at 2M and 1G both turn up.
    """
    span = KVM_PAGES_PER_HPAGE(PG_LEVEL_1G)
    base_gfn = draw(st.integers(0, max_frames * span))
    npages = draw(st.integers(1, max_frames * span))
    # The hva either keeps the gfn's offset within a 1G frame or is drawn freely.
    if draw(st.booleans()):
        ugfn = draw(st.integers(0, 64)) * span + (base_gfn % span)
    else:
        ugfn = draw(st.integers(0, 64 * span))
    return KvmMemorySlot(id=0, base_gfn=base_gfn, npages=npages, userspace_addr=ugfn << PAGE_SHIFT)
