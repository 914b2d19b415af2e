"""Unit tests for kvmsplit/shadow_mmu.py (shadow pages, write tracking, unsync and zapping in mmu.c).

Each test drives the module's functions the way their kernel callers do and
runs every named invariant afterwards through a `Checker`.
"""

from __future__ import annotations

import errno

from kvmsplit import mmu, shadow_mmu, x86
from kvmsplit.guest import X86_GPT, guest_build_identity_map
from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES
from kvmsplit.memslot import gfn_to_index, gfn_to_rmap, lpage_disallowed
from kvmsplit.mmu_page import KVM_MMU_HASH_SHIFT, hash_64, kvm_mmu_child_role
from kvmsplit.rmap import RMAP_RECYCLE_THRESHOLD, Sptep, rmap_first, rmap_iter
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    is_large_pte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_spte,
)
from tests.helpers import MiB, add_slot, new_vm

# The guest's identity map of 8 MiB with 4K pages: PML4 at 0x10, then the
# PDPT (0x11), the PD (0x12) and four page tables (0x13..0x16), each mapping
# 512 gfns.  Data pages sit at 4 MiB, in the page table 0x15.
ROOT_GFN = 0x10
TABLE_GFNS = list(range(0x11, 0x20))
DATA_GFN = 0x400
PT_OF_DATA = 0x15

L1_ROLE = KvmMmuPageRole(level=PG_LEVEL_4K)
L2_ROLE = KvmMmuPageRole(level=PG_LEVEL_2M)
# The model returns kernel errnos as negative ints.
EPERM = -errno.EPERM
EEXIST = -errno.EEXIST
ENOSPC = -errno.ENOSPC


def bare_shadow_vm():
    """A shadow-paging VM with 8 MiB of 4K-backed memory and no guest page tables yet."""
    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 8 * MiB, "4k")
    return kvm, checker


def guest_shadow_vm():
    """A shadow-paging VM whose guest identity-maps its 8 MiB with 4K pages."""
    kvm, checker = bare_shadow_vm()
    guest_build_identity_map(
        kvm, X86_GPT, root_gfn=ROOT_GFN, table_gfns=TABLE_GFNS, gfn_start=0, npages=2048, page_level=PG_LEVEL_4K
    )
    x86.kvm_set_cr3(kvm, 0, ROOT_GFN)
    return kvm, checker


def leaf_sptep(kvm, addr: int) -> Sptep:
    return mmu.shadow_walk(kvm, kvm.vcpus[0].mmu.root, addr)[-1]


def tdp_legacy_vm_with_a_huge_leaf():
    """tdp_mmu=N: one 2M SPTE in a direct level-2 shadow page maps gfns [0, 512)."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    mmu.kvm_vcpu_access(kvm, 0, 0x1000)
    checker.after_operation()
    assert kvm.stat.pages_2m == 1
    return kvm, checker


# --- __kvm_mmu_get_shadow_page(), kvm_mmu_find_shadow_page(), kvm_mmu_alloc_shadow_page() --------


def test_get_shadow_page_reuses_the_page_with_the_same_gfn_and_role() -> None:
    """kvm_mmu_find_shadow_page(): an exact (gfn, role.word) match is returned, nothing allocated."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    assert (kvm.n_used_mmu_pages, kvm.stat.mmu_cache_miss) == (1, 1)
    sp.write_flooding_count = 2
    again = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    assert again is sp
    assert (kvm.n_used_mmu_pages, kvm.stat.mmu_cache_miss) == (1, 1)
    # __clear_sp_write_flooding_count() on a synced indirect hit.
    assert sp.write_flooding_count == 0
    checker.after_operation()


def test_get_shadow_page_allocates_a_new_page_for_another_role_or_gfn() -> None:
    """kvm_mmu_alloc_shadow_page(): a miss counts mmu_cache_miss and allocates, accounted and hashed."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    first = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    other_role = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE.evolve(access=ACC_USER_MASK))
    other_gfn = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN + 1, L1_ROLE)
    assert len({id(first), id(other_role), id(other_gfn)}) == 3
    assert (kvm.n_used_mmu_pages, kvm.stat.mmu_cache_miss) == (3, 3)
    assert kvm.indirect_shadow_pages == 3
    # Oldest first in the model's active_mmu_pages (the kernel adds at the list head).
    assert list(kvm.active_mmu_pages) == [first, other_role, other_gfn]
    # The newer page of a gfn sits in front of the older one in its bucket (hlist_add_head()).
    bucket = kvm.mmu_page_hash[hash_64(DATA_GFN, KVM_MMU_HASH_SHIFT)]
    assert bucket.index(other_role) < bucket.index(first)
    assert other_gfn in kvm.mmu_page_hash[hash_64(DATA_GFN + 1, KVM_MMU_HASH_SHIFT)]
    assert kvm.sp_by_pfn[first.pfn] is first
    assert first.shadowed_translation is not None
    checker.after_operation()


def test_direct_page_needs_no_vcpu_and_has_no_shadowed_translation() -> None:
    """__kvm_mmu_get_shadow_page(vcpu=NULL) is allowed for a direct role; direct pages are not accounted as shadowed."""
    kvm, checker = bare_shadow_vm()
    role = L1_ROLE.evolve(direct=True)
    sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, 0x200, role)
    assert sp.role.direct and sp.shadowed_translation is None
    assert kvm.indirect_shadow_pages == 0
    assert shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, 0x200, role) is sp
    checker.after_operation()


def test_find_shadow_page_counts_hash_collisions_in_the_bucket() -> None:
    """kvm_mmu_find_shadow_page(): pages of other gfns in the bucket raise max_mmu_page_hash_collisions."""
    kvm, checker = bare_shadow_vm()
    role = L1_ROLE.evolve(direct=True)
    bucket = hash_64(0, KVM_MMU_HASH_SHIFT)
    # Direct 4K pages map 512-aligned gfns; find another one in the same bucket.
    other = next(g for g in range(512, 1 << 30, 512) if hash_64(g, KVM_MMU_HASH_SHIFT) == bucket)
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, 0, role)
    assert kvm.stat.max_mmu_page_hash_collisions == 0
    assert shadow_mmu.kvm_mmu_find_shadow_page(kvm, None, other, role) is None
    assert kvm.stat.max_mmu_page_hash_collisions == 1
    checker.after_operation()


def test_find_shadow_page_zaps_an_unsync_4k_page_when_an_upper_level_role_is_requested() -> None:
    """kvm_mmu_find_shadow_page(): the new upper-level table will be write-protected, so the unsync page goes."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    unsync = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    shadow_mmu.kvm_unsync_page(kvm, unsync)
    assert kvm.stat.mmu_unsync == 1
    flushes = kvm.stat.remote_tlb_flush_requests
    misses = kvm.stat.mmu_cache_miss
    assert shadow_mmu.kvm_mmu_find_shadow_page(kvm, vcpu, DATA_GFN, L2_ROLE) is None
    assert unsync.role.invalid
    assert unsync not in kvm.active_mmu_pages and unsync.pfn not in kvm.sp_by_pfn
    assert unsync not in kvm.mmu_page_hash.get(hash_64(DATA_GFN, KVM_MMU_HASH_SHIFT), [])
    assert kvm.stat.mmu_shadow_zapped == 1
    assert (kvm.n_used_mmu_pages, kvm.stat.mmu_unsync) == (0, 0)
    assert kvm.stat.mmu_cache_miss == misses + 1
    # kvm_mmu_commit_zap_page() flushes before freeing.
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()


def test_find_shadow_page_keeps_an_unsync_4k_page_when_a_4k_role_is_requested() -> None:
    """kvm_mmu_find_shadow_page(): only a request above 4K zaps unsync pages of another role."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    unsync = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    shadow_mmu.kvm_unsync_page(kvm, unsync)
    assert shadow_mmu.kvm_mmu_find_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE.evolve(access=ACC_EXEC_MASK)) is None
    assert unsync.unsync and not unsync.role.invalid
    assert kvm.stat.mmu_shadow_zapped == 0
    checker.after_operation()


# --- account_shadowed(), __kvm_write_track_add_gfn() ---------------------------------------------


def test_shadowing_an_upper_level_guest_table_write_tracks_and_write_protects_its_gfn() -> None:
    """account_shadowed() level > 4K: __kvm_write_track_add_gfn() tracks, disallows huge, write-protects, flushes."""
    kvm, checker = guest_shadow_vm()
    slot = kvm.slot(0)
    addr = DATA_GFN << 12
    mmu.kvm_vcpu_access(kvm, 0, addr, write=True)
    checker.after_operation()
    leaf = leaf_sptep(kvm, addr)
    assert is_writable_pte(leaf.spte)
    lpage_before = lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M)
    flushes = kvm.stat.remote_tlb_flush_requests
    shadowed = kvm.indirect_shadow_pages
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L2_ROLE)
    assert slot.gfn_write_track[gfn_to_index(DATA_GFN, slot.base_gfn, PG_LEVEL_4K)] == 1
    assert shadow_mmu.kvm_gfn_is_write_tracked(kvm, slot, DATA_GFN)
    assert lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M) == lpage_before + 1
    assert not is_writable_pte(leaf.spte)
    assert not is_mmu_writable_spte(kvm.masks, leaf.spte)
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert kvm.indirect_shadow_pages == shadowed + 1
    checker.after_operation()


def test_shadowing_a_4k_guest_table_write_protects_but_does_not_track_its_gfn() -> None:
    """account_shadowed() level 4K: only kvm_mmu_gfn_disallow_lpage() and a 4K write-protect with a flush."""
    kvm, checker = guest_shadow_vm()
    slot = kvm.slot(0)
    addr = DATA_GFN << 12
    mmu.kvm_vcpu_access(kvm, 0, addr, write=True)
    checker.after_operation()
    leaf = leaf_sptep(kvm, addr)
    lpage_before = lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M)
    flushes = kvm.stat.remote_tlb_flush_requests
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L1_ROLE)
    assert gfn_to_index(DATA_GFN, slot.base_gfn, PG_LEVEL_4K) not in slot.gfn_write_track
    assert not shadow_mmu.kvm_gfn_is_write_tracked(kvm, slot, DATA_GFN)
    assert lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M) == lpage_before + 1
    assert not is_writable_pte(leaf.spte) and not is_mmu_writable_spte(kvm.masks, leaf.spte)
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()


def test_shadowing_a_gfn_nothing_maps_writable_does_not_flush() -> None:
    """account_shadowed(): the flush follows kvm_mmu_slot_gfn_write_protect() only when it changed an SPTE."""
    kvm, checker = bare_shadow_vm()
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L2_ROLE)
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN + 1, L1_ROLE)
    assert kvm.stat.remote_tlb_flush_requests == 0
    checker.after_operation()


# --- mmu_try_to_unsync_pages() ------------------------------------------------------------------


def test_unsync_is_refused_with_eperm_for_a_write_tracked_gfn() -> None:
    """mmu_try_to_unsync_pages(): kvm_gfn_is_write_tracked() forces a read-only SPTE."""
    kvm, checker = bare_shadow_vm()
    shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L2_ROLE)
    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, False, False) == EPERM
    assert kvm.stat.mmu_unsync == 0
    checker.after_operation()


def test_unsync_is_refused_with_eperm_while_synchronizing() -> None:
    """mmu_try_to_unsync_pages(!can_unsync): a page being synced must not go unsync."""
    kvm, checker = bare_shadow_vm()
    sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L1_ROLE)
    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, True, False) == EPERM
    assert not sp.unsync and kvm.stat.mmu_unsync == 0
    checker.after_operation()


def test_unsync_is_refused_with_eexist_for_a_prefetch() -> None:
    """mmu_try_to_unsync_pages(prefetch): a prefetched SPTE never unsyncs a page."""
    kvm, checker = bare_shadow_vm()
    sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L1_ROLE)
    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, False, True) == EEXIST
    assert not sp.unsync
    checker.after_operation()


def test_unsync_of_a_gfn_without_shadow_pages_succeeds_and_changes_nothing() -> None:
    """mmu_try_to_unsync_pages(): no gpte page at the gfn means the SPTE may be writable."""
    kvm, checker = bare_shadow_vm()
    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, False, False) == 0
    assert kvm.stat.mmu_unsync == 0
    checker.after_operation()


def test_unsync_marks_the_4k_page_and_every_ancestor_once() -> None:
    """kvm_unsync_page() -> kvm_mmu_mark_parents_unsync(): bits in each parent, recursion only on 0 -> 1."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    grandparent = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, 0x20, KvmMmuPageRole(level=3))
    parent = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, 0x21, L2_ROLE)
    child_a = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    child_b = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN + 1, L1_ROLE)
    shadow_mmu._link_shadow_page(kvm, Sptep(grandparent, 7), parent, True)
    shadow_mmu._link_shadow_page(kvm, Sptep(parent, 5), child_a, True)
    shadow_mmu._link_shadow_page(kvm, Sptep(parent, 6), child_b, True)
    checker.after_operation()

    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, False, False) == 0
    assert child_a.unsync and kvm.stat.mmu_unsync == 1
    assert (parent.unsync_children, parent.unsync_child_bitmap) == (1, 1 << 5)
    assert (grandparent.unsync_children, grandparent.unsync_child_bitmap) == (1, 1 << 7)
    checker.after_operation()

    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN + 1, False, False) == 0
    assert (parent.unsync_children, parent.unsync_child_bitmap) == (2, (1 << 5) | (1 << 6))
    # The parent already had unsync children: no second walk up.
    assert (grandparent.unsync_children, grandparent.unsync_child_bitmap) == (1, 1 << 7)
    # An unsync page is skipped, not counted again.
    assert shadow_mmu.mmu_try_to_unsync_pages(kvm, kvm.slot(0), DATA_GFN, False, False) == 0
    assert kvm.stat.mmu_unsync == 2
    checker.after_operation()


# --- __kvm_mmu_prepare_zap_page(), kvm_mmu_commit_zap_page() --------------------------------------


def test_prepare_zap_unaccounts_the_page_and_commit_flushes_then_frees_it() -> None:
    """__kvm_mmu_prepare_zap_page() moves a page to the invalid list; kvm_mmu_commit_zap_page() flushes and frees."""
    kvm, checker = bare_shadow_vm()
    slot = kvm.slot(0)
    sp = shadow_mmu.kvm_mmu_get_shadow_page(kvm, kvm.vcpus[0], DATA_GFN, L1_ROLE)
    lpage = lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M)
    invalid_list: list = []
    unstable, nr_zapped = shadow_mmu._kvm_mmu_prepare_zap_page(kvm, sp, invalid_list)
    assert (unstable, nr_zapped) == (False, 1)
    assert kvm.stat.mmu_shadow_zapped == 1
    assert kvm.n_used_mmu_pages == 0
    assert sp.role.invalid and invalid_list == [sp]
    assert sp not in kvm.active_mmu_pages
    # unaccount_shadowed() undoes account_shadowed().
    assert kvm.indirect_shadow_pages == 0
    assert lpage_disallowed(slot, DATA_GFN, PG_LEVEL_2M) == lpage - 1
    # Still allocated until the commit.
    assert kvm.sp_by_pfn[sp.pfn] is sp
    flushes = kvm.stat.remote_tlb_flush_requests
    shadow_mmu.kvm_mmu_commit_zap_page(kvm, invalid_list)
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert invalid_list == []
    assert sp.pfn not in kvm.sp_by_pfn
    assert sp not in kvm.mmu_page_hash.get(hash_64(DATA_GFN, KVM_MMU_HASH_SHIFT), [])
    checker.after_operation()


def test_commit_of_an_empty_invalid_list_does_not_flush() -> None:
    """kvm_mmu_commit_zap_page(): list_empty() returns before kvm_flush_remote_tlbs()."""
    kvm, checker = bare_shadow_vm()
    shadow_mmu.kvm_mmu_commit_zap_page(kvm, [])
    assert kvm.stat.remote_tlb_flush_requests == 0
    checker.after_operation()


def test_zapped_root_stays_counted_until_its_last_reference_goes() -> None:
    """__kvm_mmu_prepare_zap_page(): a root with root_count is only marked invalid; mmu_free_root_page() frees it."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12)
    checker.after_operation()
    ctx = kvm.vcpus[0].root_mmu
    root = ctx.root
    assert root is not None and root.root_count == 1
    used = kvm.n_used_mmu_pages
    invalid_list: list = []
    _, nr_zapped = shadow_mmu._kvm_mmu_prepare_zap_page(kvm, root, invalid_list)
    assert nr_zapped == 0 and invalid_list == []
    assert root.role.invalid and root not in kvm.active_mmu_pages
    assert kvm.n_used_mmu_pages == used
    assert kvm.sp_by_pfn[root.pfn] is root
    flushes = kvm.stat.remote_tlb_flush_requests
    shadow_mmu.kvm_mmu_free_roots(kvm, ctx)
    assert ctx.root is None and root.root_count == 0
    assert kvm.n_used_mmu_pages == used - 1
    assert root.pfn not in kvm.sp_by_pfn
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()
    # The next access loads a fresh root.
    assert mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12).outcome == "walk"
    assert ctx.root is not None and ctx.root is not root
    checker.after_operation()


# --- kvm_mmu_zap_oldest_mmu_pages(), make_mmu_pages_available(), kvm_mmu_change_mmu_pages() ------


def test_zap_oldest_skips_roots_and_zaps_the_oldest_page_first() -> None:
    """kvm_mmu_zap_oldest_mmu_pages(): reverse walk of active_mmu_pages, roots skipped."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12)
    checker.after_operation()
    root, pdpt, pd, pt = list(kvm.active_mmu_pages)
    assert (root.gfn, pdpt.gfn, pd.gfn, pt.gfn) == (ROOT_GFN, 0x11, 0x12, PT_OF_DATA)
    flushes = kvm.stat.remote_tlb_flush_requests
    assert shadow_mmu.kvm_mmu_zap_oldest_mmu_pages(kvm, 1) == 1
    assert pdpt.role.invalid
    assert not any(sp.role.invalid for sp in (root, pd, pt))
    assert list(kvm.active_mmu_pages) == [root, pd, pt]
    assert kvm.stat.mmu_recycled == 1
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()
    assert shadow_mmu.kvm_mmu_zap_oldest_mmu_pages(kvm, 10) == 2
    assert list(kvm.active_mmu_pages) == [root]
    assert kvm.n_used_mmu_pages == 1
    checker.after_operation()


def test_make_mmu_pages_available_does_nothing_with_min_free_pages_left() -> None:
    """make_mmu_pages_available(): avail >= KVM_MIN_FREE_MMU_PAGES returns 0 at once."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + KVM_MIN_FREE_MMU_PAGES)
    used = kvm.n_used_mmu_pages
    assert shadow_mmu.make_mmu_pages_available(kvm) == 0
    assert kvm.n_used_mmu_pages == used and kvm.stat.mmu_recycled == 0
    checker.after_operation()


def test_make_mmu_pages_available_recycles_below_min_free_pages() -> None:
    """make_mmu_pages_available(): below 5 available, zap up to KVM_REFILL_PAGES - avail oldest pages."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + 2)
    assert shadow_mmu.make_mmu_pages_available(kvm) == 0
    # Only the root, which is in use, is left.
    assert kvm.n_used_mmu_pages == 1 and kvm.stat.mmu_recycled == 3
    assert kvm.kvm_mmu_available_pages() == 5
    checker.after_operation()


def test_make_mmu_pages_available_fails_with_enospc_when_only_roots_are_left() -> None:
    """make_mmu_pages_available(): -ENOSPC when zapping leaves no page available."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_mmu_reload(kvm, kvm.vcpus[0])
    assert kvm.n_used_mmu_pages == 1
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, 1)
    assert shadow_mmu.make_mmu_pages_available(kvm) == ENOSPC
    assert kvm.vcpus[0].root_mmu.root.root_count == 1
    checker.after_operation()


def test_change_mmu_pages_below_usage_zaps_the_excess_and_settles_at_what_is_left() -> None:
    """kvm_mmu_change_mmu_pages(): zap the oldest n_used - goal; if roots stop it, n_max = n_used."""
    kvm, checker = guest_shadow_vm()
    mmu.kvm_vcpu_access(kvm, 0, DATA_GFN << 12)
    assert kvm.n_used_mmu_pages == 4
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, 2)
    assert (kvm.n_used_mmu_pages, kvm.n_max_mmu_pages) == (2, 2)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, 0)
    assert (kvm.n_used_mmu_pages, kvm.n_max_mmu_pages) == (1, 1)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, 100)
    assert (kvm.n_used_mmu_pages, kvm.n_max_mmu_pages) == (1, 100)
    assert kvm.kvm_mmu_available_pages() == 99
    checker.after_operation()


# --- __link_shadow_page(), drop_parent_pte() -----------------------------------------------------


def test_link_shadow_page_drops_the_huge_leaf_and_flushes_when_asked() -> None:
    """__link_shadow_page(flush=true): drop_large_spte() zaps the 2M leaf and flushes its range."""
    kvm, checker = tdp_legacy_vm_with_a_huge_leaf()
    slot = kvm.slot(0)
    huge_sptep = leaf_sptep(kvm, 0x1000)
    assert huge_sptep.sp.role.level == PG_LEVEL_2M and is_large_pte(huge_sptep.spte)
    role = kvm_mmu_child_role(huge_sptep.sp, huge_sptep.index, True, huge_sptep.sp.role.access)
    child = shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, 0, role)
    flushes = kvm.stat.remote_tlb_flush_requests
    shadow_mmu._link_shadow_page(kvm, huge_sptep, child, True)
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert kvm.stat.pages_2m == 0
    assert gfn_to_rmap(0, PG_LEVEL_2M, slot) is None
    spte = huge_sptep.spte
    assert is_shadow_present_pte(spte) and not is_last_spte(spte, PG_LEVEL_2M)
    assert kvm.spte_to_child_sp(spte) is child
    assert list(rmap_iter(child.parent_ptes)) == [huge_sptep]
    checker.after_operation()


def test_link_shadow_page_without_flush_leaves_the_tlbs_alone() -> None:
    """__link_shadow_page(flush=false), as eager splitting calls it: the huge leaf goes, no flush."""
    kvm, checker = tdp_legacy_vm_with_a_huge_leaf()
    huge_sptep = leaf_sptep(kvm, 0x1000)
    role = kvm_mmu_child_role(huge_sptep.sp, huge_sptep.index, True, huge_sptep.sp.role.access)
    child = shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, 0, role)
    # No vCPU may still cache the 2M translation the empty child no longer provides.
    kvm.kvm_flush_remote_tlbs("test")
    flushes = kvm.stat.remote_tlb_flush_requests
    shadow_mmu._link_shadow_page(kvm, huge_sptep, child, False)
    assert kvm.stat.remote_tlb_flush_requests == flushes
    assert kvm.model_unflushed_huge_drops == 1
    assert kvm.stat.pages_2m == 0
    assert kvm.spte_to_child_sp(huge_sptep.spte) is child
    checker.after_operation()


def test_link_shadow_page_propagates_an_unsync_child_to_the_new_parent() -> None:
    """__link_shadow_page(): linking an unsync 4K page calls mark_unsync() on the parent SPTE."""
    kvm, checker = bare_shadow_vm()
    vcpu = kvm.vcpus[0]
    parent = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, 0x21, L2_ROLE)
    child = shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, DATA_GFN, L1_ROLE)
    shadow_mmu.kvm_unsync_page(kvm, child)
    shadow_mmu._link_shadow_page(kvm, Sptep(parent, 3), child, True)
    assert (parent.unsync_children, parent.unsync_child_bitmap) == (1, 1 << 3)
    checker.after_operation()


def test_drop_parent_pte_unlinks_the_child_and_owes_a_flush() -> None:
    """drop_parent_pte(): remove the parent pointer and clear the SPTE; the caller flushes."""
    kvm, checker = tdp_legacy_vm_with_a_huge_leaf()
    root = kvm.vcpus[0].root_mmu.root
    sptep = Sptep(root, 0)
    child = kvm.spte_to_child_sp(sptep.spte)
    assert rmap_first(child.parent_ptes) == sptep
    shadow_mmu.drop_parent_pte(kvm, child, sptep)
    assert sptep.spte == 0
    assert rmap_first(child.parent_ptes) is None
    assert kvm.tlb_flush_debt
    kvm.kvm_flush_remote_tlbs("drop_parent_pte caller")
    assert not kvm.tlb_flush_debt
    checker.after_operation()


# --- __rmap_add() -------------------------------------------------------------------------------


def test_rmap_add_zaps_the_whole_chain_once_it_passes_the_recycle_threshold() -> None:
    """__rmap_add(): pte_list_add() returning more than RMAP_RECYCLE_THRESHOLD zaps every SPTE of the head."""
    kvm, checker = bare_shadow_vm()
    slot = kvm.slot(0)
    vcpu = kvm.vcpus[0]
    access = ACC_USER_MASK | ACC_EXEC_MASK
    pfn = kvm.host.hva_to_pfn(slot.gfn_to_hva(DATA_GFN))
    tables = [shadow_mmu.kvm_mmu_get_shadow_page(kvm, vcpu, 0x100 + i, L1_ROLE) for i in range(2)]
    sptes = [Sptep(tables[i // 512], i % 512) for i in range(RMAP_RECYCLE_THRESHOLD + 2)]
    flushes = kvm.stat.remote_tlb_flush_requests
    for n, sptep in enumerate(sptes, start=1):
        _, spte = make_spte(kvm, sptep.sp, slot, access, DATA_GFN, pfn, 0, True, False, True)
        shadow_mmu.mmu_spte_set(kvm, sptep, spte)
        shadow_mmu.rmap_add(kvm, slot, sptep, DATA_GFN, access)
        if n == RMAP_RECYCLE_THRESHOLD + 1:
            # 1000 entries were there before this add: not over the threshold yet.
            assert kvm.stat.pages_4k == n
            assert kvm.stat.remote_tlb_flush_requests == flushes
    assert kvm.stat.max_mmu_rmap_size == RMAP_RECYCLE_THRESHOLD + 1
    assert kvm.stat.pages_4k == 0
    assert gfn_to_rmap(DATA_GFN, PG_LEVEL_4K, slot) is None
    assert not any(is_shadow_present_pte(s.spte) for s in sptes)
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    checker.after_operation()
