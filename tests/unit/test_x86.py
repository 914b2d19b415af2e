"""Unit tests for kvmsplit/x86.py (the memslot and dirty-log ioctls, module parameters, host events).

Every error the kernel returns to userspace is a HarnessError that names the
value and the errno and leaves the VM exactly as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
from kvmsplit.properties.invariants import live_pages, present_leaves

from kvmsplit import mmu, x86
from kvmsplit.errors import HarnessError
from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, dirty_bitmap_gfns
from kvmsplit.spte import is_writable_pte
from tests.helpers import HVA, GiB, MiB, add_slot, new_vm, set_logging

MANUAL_PROTECT = 1
MANUAL_PROTECT_INITIALLY_SET = 3


def _state(kvm: Kvm) -> tuple[Any, ...]:
    """What a failed ioctl must leave untouched: the memslots, the host VMAs, the counters and the stats."""
    slots = {
        slot_id: (slot, repr(slot), None if slot.dirty_bitmap is None else bytes(slot.dirty_bitmap))
        for slot_id, slot in kvm.memslots.items()
    }
    return (
        slots,
        kvm.memslots_generation,
        kvm.nr_memslot_pages,
        kvm.nr_memslots_dirty_logging,
        kvm.n_max_mmu_pages,
        kvm.n_requested_mmu_pages,
        kvm.mmu_valid_gen,
        [(vma.start, vma.end, vma.policy) for vma in kvm.host.vmas],
        kvm.stat.as_dict(),
    )


def _sptes(kvm: Kvm) -> dict[tuple[int, int], int]:
    return {(sp.pfn, i): sp.spt[i] for sp in live_pages(kvm) for i in range(512) if sp.spt[i]}


def _mapped_vm(mmu_kind: str = "tdp", size: int = 8 * MiB, **params: bool):
    """A VM with slot 0 at gpa 0 on THP, every 2M frame written once (so mapped 2M)."""
    kvm, checker = new_vm(mmu_kind, **params)
    add_slot(kvm, 0, 0, size, "thp")
    for gpa in range(0, size, 2 * MiB):
        mmu.kvm_vcpu_access(kvm, 0, gpa, write=True)
    checker.after_operation()
    return kvm, checker


# --- KVM_SET_USER_MEMORY_REGION: what each call is. ---------------------------------------


def test_a_new_slot_is_a_create_and_counts_its_pages() -> None:
    kvm, _ = new_vm("tdp")
    assert x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 8 * MiB, HVA, "thp") == x86.KVM_MR_CREATE
    slot = kvm.slot(0)
    assert (slot.base_gfn, slot.npages, slot.userspace_addr) == (0, 2048, HVA)
    assert kvm.nr_memslot_pages == 2048
    assert slot.dirty_bitmap is None


def test_size_zero_is_a_delete_that_uncounts_the_pages() -> None:
    kvm, checker = _mapped_vm()
    add_slot(kvm, 1, 64 * MiB, 4 * MiB)
    assert x86.kvm_set_user_memory_region(kvm, 1, 0, 64 * MiB, 0, HVA + 64 * MiB) == x86.KVM_MR_DELETE
    checker.after_operation()
    assert sorted(kvm.memslots) == [0]
    assert kvm.nr_memslot_pages == 2048


def test_a_new_base_gfn_is_a_move_that_keeps_size_and_hva() -> None:
    kvm, checker = _mapped_vm()
    assert x86.kvm_set_user_memory_region(kvm, 0, 0, 64 * MiB, 8 * MiB, HVA) == x86.KVM_MR_MOVE
    checker.after_operation()
    slot = kvm.slot(0)
    assert (slot.base_gfn, slot.npages, slot.userspace_addr) == (64 * MiB >> 12, 2048, HVA)
    assert kvm.nr_memslot_pages == 2048
    # The old gfns are gone from the MMU: a move zaps like a delete.
    assert kvm.stat.pages == [0, 0, 0]


def test_a_new_dirty_log_flag_alone_is_a_flags_only_change() -> None:
    kvm, checker = _mapped_vm()
    slot = kvm.slot(0)
    assert x86.kvm_set_user_memory_region(kvm, 0, KVM_MEM_LOG_DIRTY_PAGES, 0, 8 * MiB, HVA) == x86.KVM_MR_FLAGS_ONLY
    checker.after_operation()
    # The slot is updated in place, gains a clear bitmap and is counted as logging.
    assert kvm.slot(0) is slot
    assert slot.flags == KVM_MEM_LOG_DIRTY_PAGES
    assert slot.dirty_bitmap == bytearray(2048 // 8)
    assert kvm.nr_memslots_dirty_logging == 1
    assert x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 8 * MiB, HVA) == x86.KVM_MR_FLAGS_ONLY
    assert slot.dirty_bitmap is None
    assert kvm.nr_memslots_dirty_logging == 0


def test_repeating_a_slot_unchanged_is_a_no_op() -> None:
    kvm, _ = _mapped_vm()
    before = _state(kvm)
    assert x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 8 * MiB, HVA) is None
    assert _state(kvm) == before


# --- KVM_SET_USER_MEMORY_REGION: errors name the slot and the errno, and change nothing. ---


def _vm_for_errors():
    kvm, checker = _mapped_vm()
    add_slot(kvm, 1, 64 * MiB, 4 * MiB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    mmu.kvm_vcpu_access(kvm, 0, 64 * MiB + 0x3000, write=True)
    checker.after_operation()
    return kvm


REGION_ERRORS = {
    # name: (slot, flags, gpa, size, hva, backing, words the message must hold)
    "create_overlapping_slot_0": (2, 0, 4 * MiB, 8 * MiB, HVA + 128 * MiB, "thp", ("slot=2", "slot 0", "-EEXIST")),
    "move_onto_slot_0": (
        1,
        KVM_MEM_LOG_DIRTY_PAGES,
        6 * MiB,
        4 * MiB,
        HVA + 64 * MiB,
        None,
        ("slot=1", "slot 0", "-EEXIST"),
    ),
    "unaligned_gpa": (
        2,
        0,
        128 * MiB + 0x800,
        4 * MiB,
        HVA + 128 * MiB,
        "thp",
        ("slot=2", "guest_phys_addr", "-EINVAL"),
    ),
    "unaligned_size": (2, 0, 128 * MiB, 4 * MiB + 0x10, HVA + 128 * MiB, "thp", ("slot=2", "memory_size", "-EINVAL")),
    "unaligned_hva": (2, 0, 128 * MiB, 4 * MiB, HVA + 128 * MiB + 8, "thp", ("slot=2", "userspace_addr", "-EINVAL")),
    "delete_missing_slot": (5, 0, 0, 0, HVA, None, ("slot=5", "does not exist", "-EINVAL")),
    "change_npages": (0, 0, 0, 4 * MiB, HVA, None, ("slot=0", "-EINVAL")),
    "change_hva": (0, 0, 0, 8 * MiB, HVA + 256 * MiB, None, ("slot=0", "-EINVAL")),
    "toggle_readonly": (0, KVM_MEM_READONLY, 0, 8 * MiB, HVA, None, ("slot=0", "-EINVAL")),
    "unknown_flag_bit": (2, 1 << 2, 128 * MiB, 4 * MiB, HVA + 128 * MiB, "thp", ("slot=2", "0x4", "-EINVAL")),
    "slot_id_out_of_range": (32764, 0, 128 * MiB, 4 * MiB, HVA + 128 * MiB, "thp", ("slot=32764", "-EINVAL")),
    "hva_without_vma_or_backing": (2, 0, 128 * MiB, 4 * MiB, HVA + 128 * MiB, None, ("slot=2", hex(HVA + 128 * MiB))),
    "hva_past_its_vma": (2, 0, 128 * MiB, 16 * MiB, HVA, None, ("slot=2", "runs past its host VMA")),
}


@pytest.mark.parametrize("case", sorted(REGION_ERRORS))
def test_a_rejected_memory_region_names_slot_and_errno_and_changes_nothing(case: str) -> None:
    slot_id, flags, gpa, size, hva, backing, words = REGION_ERRORS[case]
    kvm = _vm_for_errors()
    before = _state(kvm)
    with pytest.raises(HarnessError) as excinfo:
        x86.kvm_set_user_memory_region(kvm, slot_id, flags, gpa, size, hva, backing)
    for word in words:
        assert word in str(excinfo.value), f"{case}: {word!r} missing from {excinfo.value}"
    assert _state(kvm) == before


# --- kvm_arch_commit_memory_region(): the default MMU page limit. ------------------------


@pytest.mark.parametrize(
    ("size", "backing", "n_max_mmu_pages"),
    [
        (4 * MiB, "thp", 64),  # 1024 pages / 50 = 20, below KVM_MIN_ALLOC_MMU_PAGES
        (GiB, "hugetlb-1g", 5242),  # 262144 pages / 50
    ],
)
def test_creating_a_slot_sets_the_default_mmu_page_limit(size: int, backing: str, n_max_mmu_pages: int) -> None:
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 0, 0, size, backing)
    assert kvm.n_max_mmu_pages == n_max_mmu_pages


def test_the_default_mmu_page_limit_follows_creates_and_deletes() -> None:
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 0, 0, GiB, "hugetlb-1g")
    add_slot(kvm, 1, 4 * GiB, 4 * MiB)
    assert kvm.n_max_mmu_pages == (262144 + 1024) // 50
    x86.kvm_set_user_memory_region(kvm, 0, 0, 0, 0, HVA)
    assert kvm.n_max_mmu_pages == 64


def test_a_requested_mmu_page_limit_survives_later_memslot_changes() -> None:
    kvm, _ = new_vm("tdp")
    x86.kvm_vm_ioctl_set_nr_mmu_pages(kvm, 100)
    assert kvm.n_max_mmu_pages == 100
    add_slot(kvm, 0, 0, GiB, "hugetlb-1g")
    assert kvm.n_max_mmu_pages == 100


@pytest.mark.parametrize("nr_mmu_pages", [0, 63, -1])
def test_set_nr_mmu_pages_below_the_minimum_is_rejected(nr_mmu_pages: int) -> None:
    kvm, _ = _mapped_vm()
    before = _state(kvm)
    with pytest.raises(HarnessError, match=r"KVM_SET_NR_MMU_PAGES.*KVM_MIN_ALLOC_MMU_PAGES=64 \(-EINVAL\)"):
        x86.kvm_vm_ioctl_set_nr_mmu_pages(kvm, nr_mmu_pages)
    assert _state(kvm) == before


def test_set_nr_mmu_pages_accepts_the_minimum() -> None:
    kvm, _ = _mapped_vm()
    x86.kvm_vm_ioctl_set_nr_mmu_pages(kvm, 64)
    assert (kvm.n_max_mmu_pages, kvm.n_requested_mmu_pages) == (64, 64)


# --- KVM_GET_DIRTY_LOG. -----------------------------------------------------------------


def _logging_vm(manual: int = 0, mmu_kind: str = "tdp", npages: int = 1024):
    """Slot 0 at gpa 0 with dirty logging on from creation (after @manual protect is enabled)."""
    kvm, checker = new_vm(mmu_kind)
    if manual:
        x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, manual)
    add_slot(kvm, 0, 0, npages << 12, "thp", flags=KVM_MEM_LOG_DIRTY_PAGES)
    return kvm, checker


def _write(kvm: Kvm, gfns: list[int]) -> None:
    for gfn in gfns:
        mmu.kvm_vcpu_access(kvm, 0, gfn << 12, write=True)


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
def test_get_dirty_log_reports_written_gfns_and_reprotects_them(mmu_kind: str) -> None:
    kvm, checker = _logging_vm(mmu_kind=mmu_kind)
    _write(kvm, [0x3, 0x200, 0x3FF])
    checker.after_operation()
    bitmap = x86.kvm_get_dirty_log(kvm, 0)
    checker.after_operation()
    assert len(bitmap) == 1024 // 8
    assert dirty_bitmap_gfns(kvm.slot(0), bitmap) == [0x3, 0x200, 0x3FF]
    # Without writes in between the next call is empty ...
    assert dirty_bitmap_gfns(kvm.slot(0), x86.kvm_get_dirty_log(kvm, 0)) == []
    # ... and a write after it faults again, so it is logged again.
    _write(kvm, [0x200])
    checker.after_operation()
    assert dirty_bitmap_gfns(kvm.slot(0), x86.kvm_get_dirty_log(kvm, 0)) == [0x200]


def test_a_read_fault_in_a_logged_slot_maps_writable_and_is_reported_dirty() -> None:
    """make_spte() gives a read fault ACC_ALL and marks the gfn dirty when the SPTE is writable."""
    kvm, checker = _logging_vm()
    mmu.kvm_vcpu_access(kvm, 0, 0x100 << 12)
    checker.after_operation()
    assert dirty_bitmap_gfns(kvm.slot(0), x86.kvm_get_dirty_log(kvm, 0)) == [0x100]


def test_a_read_of_a_write_protected_page_is_not_reported_dirty() -> None:
    kvm, checker = _logging_vm()
    _write(kvm, [0x100])
    x86.kvm_get_dirty_log(kvm, 0)
    mmu.kvm_vcpu_access(kvm, 0, 0x100 << 12)
    checker.after_operation()
    assert dirty_bitmap_gfns(kvm.slot(0), x86.kvm_get_dirty_log(kvm, 0)) == []


def test_get_dirty_log_write_protects_what_it_reports_and_flushes_once() -> None:
    kvm, checker = _logging_vm()
    _write(kvm, [0x3, 0x4])
    flushes = kvm.stat.remote_tlb_flush_requests
    x86.kvm_get_dirty_log(kvm, 0)
    checker.after_operation()
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert not any(is_writable_pte(spte) for _, _, spte in present_leaves(kvm))


def test_get_dirty_log_with_nothing_dirty_does_not_flush() -> None:
    kvm, _ = _logging_vm()
    flushes = kvm.stat.remote_tlb_flush_requests
    assert x86.kvm_get_dirty_log(kvm, 0) == bytes(1024 // 8)
    assert kvm.stat.remote_tlb_flush_requests == flushes


def test_get_dirty_log_with_manual_protect_does_not_clear() -> None:
    kvm, checker = _logging_vm(manual=MANUAL_PROTECT)
    _write(kvm, [0x3, 0x200])
    checker.after_operation()
    sptes = _sptes(kvm)
    first = x86.kvm_get_dirty_log(kvm, 0)
    second = x86.kvm_get_dirty_log(kvm, 0)
    assert dirty_bitmap_gfns(kvm.slot(0), first) == [0x3, 0x200]
    assert second == first
    assert _sptes(kvm) == sptes


@pytest.mark.parametrize("slot_id", [0, 7])
def test_get_dirty_log_of_a_slot_that_is_not_logged_is_enoent(slot_id: int) -> None:
    kvm, _ = _mapped_vm()
    with pytest.raises(HarnessError, match=rf"KVM_GET_DIRTY_LOG: slot {slot_id} .*\(-ENOENT\)"):
        x86.kvm_get_dirty_log(kvm, slot_id)


# --- KVM_CLEAR_DIRTY_LOG. ------------------------------------------------------------------

# A 1000-page slot: its last 64-page word is partial (pages 960..999).
CLEAR_ERRORS = {
    "first_page_not_a_multiple_of_64": (32, 64, r"first_page 32 is not a multiple of 64 \(-EINVAL\)"),
    "num_pages_not_a_multiple_of_64_short_of_the_end": (0, 100, r"pages 0x0\+0x64 do not fit slot 0 .*\(-EINVAL\)"),
    "range_past_the_slot_end": (960, 64, r"pages 0x3c0\+0x40 do not fit slot 0 of 0x3e8 pages \(-EINVAL\)"),
    "first_page_past_the_slot": (1024, 0, r"pages 0x400\+0x0 do not fit slot 0 .*\(-EINVAL\)"),
    "range_longer_than_the_slot": (0, 2048, r"pages 0x0\+0x800 do not fit slot 0 .*\(-EINVAL\)"),
}


@pytest.mark.parametrize("case", sorted(CLEAR_ERRORS))
def test_clear_dirty_log_rejects_a_bad_range_and_changes_nothing(case: str) -> None:
    first_page, num_pages, message = CLEAR_ERRORS[case]
    kvm, checker = _logging_vm(manual=MANUAL_PROTECT, npages=1000)
    _write(kvm, [0x3, 0x3C5])
    checker.after_operation()
    before, sptes = _state(kvm), _sptes(kvm)
    with pytest.raises(HarnessError, match=rf"KVM_CLEAR_DIRTY_LOG: {message}"):
        x86.kvm_clear_dirty_log(kvm, 0, first_page, num_pages, b"\xff" * 256)
    assert _state(kvm) == before
    assert _sptes(kvm) == sptes


def test_clear_dirty_log_without_manual_protect_is_rejected() -> None:
    kvm, checker = _logging_vm(npages=1000)
    _write(kvm, [0x3])
    checker.after_operation()
    before = _state(kvm)
    with pytest.raises(
        HarnessError, match=r"KVM_CLEAR_DIRTY_LOG: manual dirty-log protection is not enabled \(-EINVAL\)"
    ):
        x86.kvm_clear_dirty_log(kvm, 0, 0, 1000, b"\xff" * 128)
    assert _state(kvm) == before


@pytest.mark.parametrize(("first_page", "num_pages"), [(960, 40), (0, 1000), (0, 64)])
def test_clear_dirty_log_accepts_ranges_that_are_whole_words_or_reach_the_end(first_page: int, num_pages: int) -> None:
    kvm, checker = _logging_vm(manual=MANUAL_PROTECT, npages=1000)
    _write(kvm, [0x3, 0x3C5])
    checker.after_operation()
    x86.kvm_clear_dirty_log(kvm, 0, first_page, num_pages, b"\xff" * 128)
    checker.after_operation()
    cleared = [g for g in (0x3, 0x3C5) if first_page <= g < first_page + num_pages]
    assert dirty_bitmap_gfns(kvm.slot(0)) == [g for g in (0x3, 0x3C5) if g not in cleared]


def test_clear_dirty_log_clears_only_set_bits_and_reprotects_them() -> None:
    kvm, checker = _logging_vm(manual=MANUAL_PROTECT, npages=1000)
    _write(kvm, [0x3, 0x4])
    checker.after_operation()
    flushes = kvm.stat.remote_tlb_flush_requests
    bitmap = bytearray(8)
    bitmap[0] = (1 << 3) | (1 << 5)  # gfn 5 was never dirty
    x86.kvm_clear_dirty_log(kvm, 0, 0, 64, bytes(bitmap))
    checker.after_operation()
    assert dirty_bitmap_gfns(kvm.slot(0)) == [0x4]
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    _write(kvm, [0x3])
    assert dirty_bitmap_gfns(kvm.slot(0)) == [0x3, 0x4]


# --- KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2), initially-set. --------------------------------


@pytest.mark.parametrize("flags", [2, 4, 7])
def test_manual_protect_rejects_initially_set_alone_and_unknown_bits(flags: int) -> None:
    kvm, _ = new_vm("tdp")
    with pytest.raises(HarnessError, match=r"MANUAL_DIRTY_LOG_PROTECT2.*\(-EINVAL\)"):
        x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, flags)
    assert kvm.manual_dirty_log_protect == 0


def test_initially_set_allocates_a_bitmap_of_ones_up_to_npages() -> None:
    kvm, _ = _logging_vm(manual=MANUAL_PROTECT_INITIALLY_SET, npages=1000)
    slot = kvm.slot(0)
    assert slot.dirty_bitmap is not None
    assert len(slot.dirty_bitmap) == 128
    assert dirty_bitmap_gfns(slot) == list(range(1000))


def test_enabling_logging_in_initially_set_mode_changes_no_spte_and_does_not_flush() -> None:
    kvm, checker = new_vm("tdp")
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, MANUAL_PROTECT_INITIALLY_SET)
    add_slot(kvm, 0, 0, 8 * MiB, "thp")
    _write(kvm, [0, 0x200, 0x400, 0x600])
    checker.after_operation()
    sptes, flushes = _sptes(kvm), kvm.stat.remote_tlb_flush_requests
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert _sptes(kvm) == sptes
    assert kvm.stat.pages == [0, 4, 0]
    assert kvm.stat.remote_tlb_flush_requests == flushes
    assert dirty_bitmap_gfns(kvm.slot(0)) == list(range(2048))


# --- kvm_mmu_slot_apply_flags(). ---------------------------------------------------------------


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
@pytest.mark.parametrize("eager_page_split", [True, False])
def test_enabling_dirty_logging_write_protects_the_slot_with_one_flush(mmu_kind: str, eager_page_split: bool) -> None:
    kvm, checker = _mapped_vm(mmu_kind, eager_page_split=eager_page_split)
    flushes = kvm.stat.remote_tlb_flush_requests
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    assert not any(is_writable_pte(spte) for _, _, spte in present_leaves(kvm))


def test_enabling_dirty_logging_splits_eagerly_on_the_tdp_mmu() -> None:
    kvm, checker = _mapped_vm("tdp", eager_page_split=True)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages == [2048, 0, 0]


def test_enabling_dirty_logging_without_eager_split_keeps_huge_pages() -> None:
    kvm, checker = _mapped_vm("tdp", eager_page_split=False)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages == [0, 4, 0]


# --- Whole-VM zaps: memslot delete and nx_huge_pages. -------------------------------------------


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
def test_deleting_any_memslot_zaps_every_mapping_fast(mmu_kind: str) -> None:
    """kvm_arch_flush_shadow_memslot() -> kvm_mmu_zap_all_fast(): slot 0 loses its mappings too."""
    kvm, checker = _mapped_vm(mmu_kind)
    add_slot(kvm, 1, 64 * MiB, 2 * MiB)
    root = kvm.vcpus[0].root_mmu.root
    assert root is not None and not root.role.invalid
    gen = kvm.mmu_valid_gen
    x86.kvm_set_user_memory_region(kvm, 1, 0, 64 * MiB, 0, HVA + 64 * MiB)
    checker.after_operation()
    assert kvm.mmu_valid_gen == gen ^ 1
    assert root.role.invalid
    assert kvm.stat.pages == [0, 0, 0]
    # Only the root the vCPU still holds is left, waiting for the vCPU to drop it;
    # the shadow MMU keeps such a root accounted (kvm_mmu_prepare_zap_page()).
    assert live_pages(kvm) == [root]
    assert kvm.tdp_mmu_pages == 0
    assert kvm.n_used_mmu_pages == (1 if mmu_kind == "tdp-legacy" else 0)


def test_set_nx_huge_pages_to_a_new_value_zaps_everything() -> None:
    kvm, checker = _mapped_vm("tdp")
    root = kvm.vcpus[0].root_mmu.root
    assert root is not None
    gen = kvm.mmu_valid_gen
    x86.set_nx_huge_pages(kvm, True)
    checker.after_operation()
    assert kvm.nx_huge_pages
    assert kvm.mmu_valid_gen == gen ^ 1
    assert root.role.invalid
    assert kvm.stat.pages == [0, 0, 0]


def test_set_nx_huge_pages_to_the_same_value_zaps_nothing() -> None:
    kvm, _ = _mapped_vm("tdp")
    before, sptes = _state(kvm), _sptes(kvm)
    x86.set_nx_huge_pages(kvm, False)
    assert _state(kvm) == before
    assert _sptes(kvm) == sptes


def test_set_eager_page_split_only_changes_the_parameter() -> None:
    kvm, _ = _mapped_vm("tdp")
    before = _state(kvm)
    x86.set_eager_page_split(kvm, False)
    assert kvm.eager_page_split is False
    assert _state(kvm) == before


# --- Host events reach KVM through the MMU notifier. ----------------------------------------------


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
def test_a_host_thp_split_zaps_the_huge_spte_and_flushes(mmu_kind: str) -> None:
    kvm, checker = _mapped_vm(mmu_kind, size=4 * MiB)
    flushes = kvm.stat.remote_tlb_flush_requests
    assert x86.host_thp_split(kvm, HVA + 0x5000)
    checker.after_operation()
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    # The frame now maps 4K: the host page is 4K.
    mmu.kvm_vcpu_access(kvm, 0, 0x5000)
    checker.after_operation()
    assert kvm.stat.pages[1] == 1 and kvm.stat.pages[0] >= 1


def test_a_host_thp_split_of_a_4k_page_changes_nothing() -> None:
    kvm, _ = _mapped_vm("tdp", size=4 * MiB)
    x86.host_thp_split(kvm, HVA)
    before = _state(kvm)
    assert x86.host_thp_split(kvm, HVA) is False
    assert _state(kvm) == before


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
def test_a_host_thp_collapse_zaps_the_4k_sptes_and_flushes(mmu_kind: str) -> None:
    kvm, checker = _mapped_vm(mmu_kind, size=4 * MiB)
    x86.host_thp_split(kvm, HVA)
    for gpa in range(0, 2 * MiB, 64 * 4096):
        mmu.kvm_vcpu_access(kvm, 0, gpa, write=True)
    checker.after_operation()
    assert kvm.stat.pages[0] > 0
    flushes = kvm.stat.remote_tlb_flush_requests
    assert x86.host_thp_collapse(kvm, HVA + 0x1000)
    checker.after_operation()
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1
    mmu.kvm_vcpu_access(kvm, 0, 0x1000)
    checker.after_operation()
    assert kvm.stat.pages == [0, 2, 0]


def test_a_host_thp_collapse_outside_any_thp_vma_is_refused() -> None:
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "4k")
    before = _state(kvm)
    assert x86.host_thp_collapse(kvm, HVA) is False
    assert x86.host_thp_collapse(kvm, HVA + 64 * MiB) is False
    assert _state(kvm) == before


@pytest.mark.parametrize("mmu_kind", ["tdp", "tdp-legacy"])
def test_host_madv_dontneed_zaps_the_range_and_flushes(mmu_kind: str) -> None:
    kvm, checker = _mapped_vm(mmu_kind, size=4 * MiB)
    flushes = kvm.stat.remote_tlb_flush_requests
    x86.host_madv_dontneed(kvm, HVA + 2 * MiB, 4096)
    checker.after_operation()
    # The partial free splits the host page, so the whole 2M SPTE goes.
    assert kvm.stat.pages == [0, 1, 0]
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1


def test_host_madv_dontneed_of_unmapped_memory_does_not_flush() -> None:
    kvm, _ = _mapped_vm("tdp", size=4 * MiB)
    flushes = kvm.stat.remote_tlb_flush_requests
    x86.host_madv_dontneed(kvm, HVA + 64 * MiB, 2 * MiB)
    assert kvm.stat.remote_tlb_flush_requests == flushes
    assert kvm.stat.pages == [0, 2, 0]


@pytest.mark.parametrize(("hva", "size"), [(HVA + 8, 4096), (HVA, 100), (HVA, 0)])
def test_host_madv_dontneed_rejects_an_unaligned_or_empty_range(hva: int, size: int) -> None:
    kvm, _ = _mapped_vm("tdp", size=4 * MiB)
    before = _state(kvm)
    with pytest.raises(HarnessError, match=rf"host_madv_dontneed: hva {hva:#x} size {size:#x} is not page aligned"):
        x86.host_madv_dontneed(kvm, hva, size)
    assert _state(kvm) == before
