"""Kernel behaviours the model once got wrong, each pinned where it was found.

Found by reading the model against the kernel and by the state machine;
each test names the kernel function whose behaviour it pins.
"""

from __future__ import annotations

import pytest

from kvmsplit import mmu, x86
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, dirty_bitmap_gfns
from kvmsplit.spte import PT_ACCESSED_MASK
from tests.helpers import HVA, MiB, add_slot, new_vm, run, set_logging


def test_tdp_huge_leaf_replacing_a_table_flushes() -> None:
    """tdp_mmu_map_handle_target_level(): iter->old_spte still holds the table after the cmpxchg, so KVM flushes."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0x1000, 0x1001, 4096)
    x86.host_thp_split(kvm, HVA)
    run(kvm, checker, 0, 0x1000, 0x1001, 4096)
    assert kvm.stat.pages_2m == 0 and kvm.stat.pages_4k == 1
    assert x86.host_thp_collapse(kvm, HVA)
    before = kvm.stat.remote_tlb_flush_requests
    run(kvm, checker, 0, 0x1000, 0x1001, 4096)
    assert kvm.stat.pages_2m == 1
    assert kvm.stat.remote_tlb_flush_requests == before + 1


def test_shadow_mmu_counts_mmio_sptes_it_creates() -> None:
    """mmu_set_spte(): a no-slot pfn bumps pf_mmio_spte_created before mark_mmio_spte()."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    r = mmu.kvm_vcpu_access(kvm, 0, 64 * MiB)
    checker.after_operation()
    assert r.outcome == "mmio"
    assert kvm.vcpus[0].stat.pf_mmio_spte_created == 1


def test_direct_prefetch_maps_the_populated_prefix_of_each_run() -> None:
    """direct_pte_prefetch_many(): gfn_to_page_many_atomic() returns the populated prefix; later runs still go."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 4 * MiB, "4k")
    for gfn in (8, 10, 11, 13, 14, 15):
        kvm.host.hva_to_pfn(HVA + (gfn << 12))
    run(kvm, checker, 0, 12 << 12, (12 << 12) + 1, 4096)
    root = kvm.vcpus[0].root_mmu.root
    mapped = [g for g in range(8, 16) if mmu.shadow_walk(kvm, root, g << 12)[-1].spte]
    assert mapped == [8, 12, 13, 14, 15]


def test_resynced_spte_starts_access_tracked() -> None:
    """FNAME(sync_spte) calls make_spte(prefetch=true, can_unsync=false) in the baseline: A starts clear."""
    from kvmsplit.guest import X86_GPT, guest_build_identity_map
    from kvmsplit.spte import ACC_ALL

    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 8 * MiB, "4k")
    guest_build_identity_map(
        kvm, X86_GPT, root_gfn=0x10, table_gfns=[0x11, 0x12, 0x13, 0x14], gfn_start=0, npages=1024, page_level=1
    )
    x86.kvm_set_cr3(kvm, 0, 0x10)
    run(kvm, checker, 0, 0x200000, 0x200001, 4096)  # shadows the 4K table at gfn 0x14
    # Make that table unsync, then narrow an entry's access so a resync rewrites it.
    mmu.kvm_vcpu_access(kvm, 0, 0x14000, write=True, data=(0, X86_GPT.make_gpte(0x200, ACC_ALL & ~2)))
    checker.after_operation()
    assert kvm.stat.mmu_unsync == 1
    x86.kvm_guest_tlb_flush(kvm, 0)
    checker.after_operation()
    leaf = mmu.shadow_walk(kvm, kvm.vcpus[0].root_mmu.root, 0x200000)[-1]
    assert leaf.spte and not leaf.spte & PT_ACCESSED_MASK


def test_moving_a_logged_slot_keeps_its_dirty_bitmap_and_count() -> None:
    """kvm_prepare_memory_region() keeps the old bitmap for any change but a delete;
    kvm_commit_memory_region() counts logging slots on every change that flips the flag."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp", flags=KVM_MEM_LOG_DIRTY_PAGES)
    run(kvm, checker, 0, 0x3000, 0x3001, 4096, "write")
    x86.kvm_set_user_memory_region(kvm, 0, KVM_MEM_LOG_DIRTY_PAGES, 8 * MiB, 4 * MiB, HVA)
    assert dirty_bitmap_gfns(kvm.slot(0)) == [(8 * MiB >> 12) + 3]
    x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 4 * MiB, HVA)
    assert kvm.nr_memslots_dirty_logging == 0


def test_deleting_a_slot_zaps_while_the_slot_is_still_visible() -> None:
    """kvm_invalidate_memslot(): rmap_remove() during the zap still finds the (invalid) slot."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 1, 16 * MiB, 4 * MiB, "4k")
    run(kvm, checker, 0, 16 * MiB, 16 * MiB + 1, 4096)
    x86.kvm_set_user_memory_region(kvm, 1, 0, 16 * MiB, 0, HVA + 16 * MiB)
    checker.after_operation()
    assert kvm.stat.pages_4k == 0 and 1 not in kvm.memslots


def test_access_after_a_fast_zap_does_not_see_the_old_roots_tlb() -> None:
    """kvm_mmu_load() flushes the current TLB: entries cached under the old root are gone."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 1, 4096, "write")
    x86.set_nx_huge_pages(kvm, True)
    checker.after_operation()
    run(kvm, checker, 0, 0, 1, 4096)
    assert kvm.stat.pages_2m == 1


def test_dirty_bit_dropped_on_rebuild_needs_no_flush_outside_pml() -> None:
    """make_spte() skips D for an already-writable leaf; handle_changed_spte() hands D to the page, no flush."""
    kvm, checker = new_vm("tdp", nx_huge_pages=True)
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 1, 4096)
    run(kvm, checker, 0, 0, 1, 4096, "exec")
    assert kvm.stat.pages_4k == 512


def test_logging_slot_set_with_logging_counts_once() -> None:
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    set_logging(kvm, 0, True)
    set_logging(kvm, 0, False)
    set_logging(kvm, 0, True)
    assert kvm.nr_memslots_dirty_logging == 1


# Found by the conformance oracle against real KVM (kvmsplit conform, tests/realkvm).


def test_partial_madv_dontneed_of_a_thp_zaps_the_whole_frame() -> None:
    """zap_pmd_range() splits a THP the range covers in part; __split_huge_pmd() invalidates all 2M of it."""
    from kvmsplit.guest import X86_GPT, guest_build_identity_map

    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 4 * MiB, "4k")
    add_slot(kvm, 1, 16 * MiB, 4 * MiB, "thp")
    tables = list(range(0x11, 0x11 + 8))
    guest_build_identity_map(
        kvm, X86_GPT, root_gfn=0x10, table_gfns=tables, gfn_start=16 * MiB >> 12, npages=1024, page_level=1
    )
    x86.kvm_set_cr3(kvm, 0, 0x10)
    run(kvm, checker, 0, 16 * MiB, 18 * MiB, 4096)
    pages, flushes = kvm.stat.pages_4k, kvm.stat.remote_tlb_flush_requests
    x86.host_madv_dontneed(kvm, kvm.slot(1).userspace_addr + 0x10000, 0x10000)
    checker.after_operation()
    # First the 16 freed pages, then the other 496 when the PMD splits: two flushes.
    assert kvm.stat.pages_4k == pages - 512
    assert kvm.stat.remote_tlb_flush_requests == flushes + 2


@pytest.mark.parametrize(("width", "pde_zapped"), [(1, 0), (2, 0), (4, 1), (8, 1)])
def test_guest_pde_store_counts_mmu_pde_zapped_only_with_a_gpte_read(width: int, pde_zapped: int) -> None:
    """mmu_pte_write_fetch_gpte(): only a 4- or 8-byte store reads a new gpte; gentry 0 is not counted."""
    from kvmsplit.guest import X86_GPT, guest_build_identity_map

    kvm, checker = new_vm("shadow")
    add_slot(kvm, 0, 0, 8 * MiB, "4k")
    guest_build_identity_map(
        kvm, X86_GPT, root_gfn=0x10, table_gfns=[0x11, 0x12], gfn_start=0, npages=2048, page_level=2
    )
    x86.kvm_set_cr3(kvm, 0, 0x10)
    run(kvm, checker, 0, 0, 4 * MiB, 2 * MiB)
    old = kvm.guest_tables[0x12][1]
    mmu.kvm_vcpu_access(kvm, 0, (0x12 << 12) + 8, write=True, data=(1, old & ~0xFF | 0x01, width))
    checker.after_operation()
    assert kvm.stat.mmu_pte_write == 1
    assert kvm.stat.mmu_pde_zapped == pde_zapped
    # A 2-byte store is misaligned for an 8-byte gpte: the whole page goes.
    assert kvm.stat.mmu_flooded == (1 if width == 2 else 0)
    assert kvm.guest_tables[0x12][1] & ((1 << (8 * width)) - 1) == (old & ~0xFF | 0x01) & ((1 << (8 * width)) - 1)
