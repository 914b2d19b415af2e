"""Unit tests for kvmsplit/kvm.py (struct kvm, struct kvm_vcpu, configuration, flushes, accounting)."""

from __future__ import annotations

import attrs
import pytest

from kvmsplit import mmu
from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn
from kvmsplit.kvm import (
    KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO,
    KVM_MIN_ALLOC_MMU_PAGES,
    MMU_CONFIGS,
    Kvm,
    KvmConfig,
    kvm_vcpu_flush_tlb_guest,
    page_table_pfn_range_ok,
)
from kvmsplit.spte import EPT_MASKS, NON_EPT_MASKS, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, make_nonleaf_spte
from kvmsplit.tlb import TlbEntry
from tests.helpers import MiB, add_slot, new_vm

# --- KvmConfig ---------------------------------------------------------------------------


def test_tdp_config_runs_the_tdp_mmu_on_ept() -> None:
    """tdp_mmu_enabled with ept=Y: the EPT SPTE layout (kvm_mmu_set_ept_masks())."""
    config = KvmConfig.named("tdp")
    assert config.tdp_enabled and config.tdp_mmu_enabled
    assert config.masks is EPT_MASKS


def test_tdp_legacy_config_runs_ept_without_the_tdp_mmu() -> None:
    """tdp_mmu=N: direct shadow pages in the shadow MMU, EPT layout."""
    config = KvmConfig.named("tdp-legacy")
    assert config.tdp_enabled and not config.tdp_mmu_enabled
    assert config.masks is EPT_MASKS


def test_shadow_config_has_no_tdp_and_so_no_tdp_mmu_and_the_non_ept_layout() -> None:
    """tdp_mmu_enabled needs tdp_enabled (ept=N), whatever the tdp_mmu parameter says."""
    config = KvmConfig.named("shadow")
    assert not config.tdp_enabled and config.tdp_mmu
    assert not config.tdp_mmu_enabled
    assert config.masks is NON_EPT_MASKS


def test_every_named_config_is_listed() -> None:
    """Model: MMU_CONFIGS names exactly the configurations KvmConfig.named() accepts."""
    for name in MMU_CONFIGS:
        assert isinstance(KvmConfig.named(name), KvmConfig)


def test_an_unknown_config_name_is_a_harness_error_naming_the_choices() -> None:
    """Model: bad input is a HarnessError whose message names the value and the fix."""
    with pytest.raises(HarnessError, match=r"'ept-only'.*tdp, tdp-legacy, shadow"):
        KvmConfig.named("ept-only")


def test_named_config_takes_overrides() -> None:
    """Model: module parameters override a named configuration; PML gives cpu_dirty_log_size 512 (VMX)."""
    config = KvmConfig.named("tdp", pml=True)
    assert config.pml and config.cpu_dirty_log_size == 512
    assert KvmConfig.named("tdp").cpu_dirty_log_size == 0


def test_pml_needs_ept() -> None:
    """kvm_x86_ops.cpu_dirty_log_size is set by VMX with EPT only."""
    assert KvmConfig.named("shadow", pml=True).cpu_dirty_log_size == 0


def test_config_is_frozen() -> None:
    """Model: module parameters fixed at load time cannot change under a running VM."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        KvmConfig.named("tdp").tdp_mmu = False  # type: ignore[misc]


# --- Kvm.create(), lookups ---------------------------------------------------------------


def test_create_makes_the_vcpus_with_empty_tlbs_and_no_roots() -> None:
    """KVM_CREATE_VM + KVM_CREATE_VCPU: roots are loaded lazily (kvm_mmu_reload()), TLBs start empty."""
    kvm = Kvm.create("tdp-legacy", nr_vcpus=3)
    assert [v.vcpu_id for v in kvm.vcpus] == [0, 1, 2]
    assert not kvm.tdp_mmu_enabled
    for v in kvm.vcpus:
        assert v.root_mmu.root is None and v.guest_mmu.root is None
        assert not v.tlb.leaves and not v.guest_mode
        assert v.mmu is v.root_mmu


@pytest.mark.parametrize("nr_vcpus", [0, -1, 65, 2.0, "2", None])
def test_create_with_a_bad_vcpu_count_is_a_harness_error(nr_vcpus: object) -> None:
    """Model: Kvm.create() takes 1..64 vCPUs as an int and names a bad value."""
    with pytest.raises(HarnessError, match="nr_vcpus"):
        Kvm.create("tdp", nr_vcpus=nr_vcpus)  # type: ignore[arg-type]


def test_create_accepts_64_vcpus() -> None:
    """Model: the largest VM Kvm.create() builds."""
    assert len(Kvm.create("tdp", nr_vcpus=64).vcpus) == 64


@pytest.mark.parametrize("vcpu_id", [-1, 1, "0"])
def test_a_missing_vcpu_is_a_harness_error(vcpu_id: object) -> None:
    """Model: Kvm.vcpu() names a vCPU id the VM does not have."""
    kvm = Kvm.create("tdp")
    with pytest.raises(HarnessError, match="vcpu"):
        kvm.vcpu(vcpu_id)  # type: ignore[arg-type]


def test_a_missing_slot_is_a_harness_error_listing_the_slots() -> None:
    """Model: Kvm.slot() names the missing id and the slots that exist."""
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 3, 0, 2 * MiB)
    with pytest.raises(HarnessError, match=r"memslot 4 .*\[3\]"):
        kvm.slot(4)


def test_gfn_to_memslot_finds_the_slot_holding_the_gfn() -> None:
    """__gfn_to_memslot(): [base_gfn, base_gfn + npages) of exactly one slot, or none."""
    kvm, _ = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB)
    add_slot(kvm, 1, 4 * MiB, 2 * MiB)
    assert kvm.gfn_to_memslot(0x1FF) is kvm.slot(0)
    assert kvm.gfn_to_memslot(0x200) is None
    assert kvm.gfn_to_memslot(0x400) is kvm.slot(1)
    assert kvm.gfn_to_memslot(0x600) is None


def test_page_table_pfns_never_alias_guest_memory() -> None:
    """Model: page table pfns come from their own pool above SP_PFN_BASE, one frame each."""
    kvm = Kvm.create("tdp")
    pfns = [kvm.alloc_page_table_pfn() for _ in range(3)]
    assert pfns == sorted(set(pfns)) and pfns[1] == pfns[0] + 1
    assert all(page_table_pfn_range_ok(p) for p in pfns)


# --- stats, accounting -------------------------------------------------------------------


def test_page_stats_are_indexed_by_level_minus_one() -> None:
    """kvm_update_page_stats(): pages[level - 1]."""
    kvm = Kvm.create("tdp")
    kvm.kvm_update_page_stats(PG_LEVEL_4K, 3)
    kvm.kvm_update_page_stats(PG_LEVEL_2M, 2)
    kvm.kvm_update_page_stats(PG_LEVEL_1G, 1)
    kvm.kvm_update_page_stats(PG_LEVEL_4K, -1)
    assert (kvm.stat.pages_4k, kvm.stat.pages_2m, kvm.stat.pages_1g) == (2, 2, 1)
    d = kvm.stat.as_dict()
    assert (d["pages_4k"], d["pages_2m"], d["pages_1g"]) == (2, 2, 1)
    assert "pages" not in d


def test_available_pages_are_never_negative() -> None:
    """kvm_mmu_available_pages(): n_max - n_used if positive, else 0."""
    kvm = Kvm.create("tdp")
    kvm.n_max_mmu_pages, kvm.n_used_mmu_pages = 64, 10
    assert kvm.kvm_mmu_available_pages() == 54
    kvm.n_used_mmu_pages = 70
    assert kvm.kvm_mmu_available_pages() == 0


def test_memslot_creation_sets_the_default_mmu_page_limit() -> None:
    """kvm_arch_commit_memory_region(): nr_memslot_pages / 50, at least KVM_MIN_ALLOC_MMU_PAGES."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 2 * MiB)
    assert kvm.n_max_mmu_pages == KVM_MIN_ALLOC_MMU_PAGES
    add_slot(kvm, 1, 1 << 30, 1 << 30, "hugetlb-1g")
    assert kvm.n_max_mmu_pages == (512 + 262144) // KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO
    checker.after_operation()


def test_nx_huge_page_mitigation_is_off_when_the_vm_disables_it() -> None:
    """is_nx_huge_page_enabled(): nx_huge_pages && !kvm->arch.disable_nx_huge_pages."""
    kvm = Kvm.create("tdp", nx_huge_pages=True)
    assert kvm.is_nx_huge_page_enabled()
    kvm.disable_nx_huge_pages = True
    assert not kvm.is_nx_huge_page_enabled()


def test_rmaps_exist_with_the_tdp_mmu_only_once_a_shadow_root_is_allocated() -> None:
    """kvm_memslots_have_rmaps(): !tdp_mmu_enabled || shadow_root_allocated."""
    assert Kvm.create("tdp-legacy").kvm_memslots_have_rmaps()
    assert Kvm.create("shadow").kvm_memslots_have_rmaps()
    kvm = Kvm.create("tdp")
    assert not kvm.kvm_memslots_have_rmaps()
    kvm.shadow_root_allocated = True
    assert kvm.kvm_memslots_have_rmaps()


# --- kvm_flush_remote_tlbs(), flush debts ------------------------------------------------------


def _fill(kvm: Kvm) -> None:
    for v in kvm.vcpus:
        v.tlb.fill("root_mmu", 0x1000, TlbEntry(PG_LEVEL_4K, 0x100001, 7, True), [(4, 0x100000000)])
        v.tlb.fill("guest_mmu", 0x1000, TlbEntry(PG_LEVEL_4K, 0x100002, 7, True), [])


def test_remote_flush_empties_every_vcpu_tlb_and_counts_the_request() -> None:
    """kvm_flush_remote_tlbs(): every vCPU drops every cached translation before the call returns."""
    kvm = Kvm.create("tdp", nr_vcpus=3)
    _fill(kvm)
    seen: list[str] = []
    kvm.flush_hooks.append(lambda k, why: seen.append(why))
    kvm.kvm_flush_remote_tlbs("why")
    assert all(not v.tlb.leaves and not v.tlb.walks for v in kvm.vcpus)
    assert (kvm.stat.remote_tlb_flush_requests, kvm.stat.remote_tlb_flush) == (1, 1)
    assert seen == ["why"]


def test_range_and_memslot_flushes_are_full_flushes() -> None:
    """Model: no range-flush hypercall, so kvm_flush_remote_tlbs_range() flushes everything."""
    kvm, _ = new_vm("tdp", nr_vcpus=2)
    add_slot(kvm, 0, 0, 2 * MiB)
    _fill(kvm)
    kvm.kvm_flush_remote_tlbs_range(0x1000, 1)
    assert all(not v.tlb.leaves for v in kvm.vcpus)
    _fill(kvm)
    kvm.kvm_flush_remote_tlbs_memslot(kvm.slot(0))
    assert all(not v.tlb.leaves for v in kvm.vcpus)
    assert kvm.stat.remote_tlb_flush_requests == 2


def test_a_flush_pays_every_owed_flush() -> None:
    """Model: owe_flush() records what needs a flush; kvm_flush_remote_tlbs() clears both debts."""
    kvm = Kvm.create("tdp")
    kvm.owe_flush("zap")
    kvm.owe_flush("dirty-log write-protect", deferred=True)
    assert kvm.tlb_flush_debt == ["zap"]
    assert kvm.tlb_flush_debt_deferred == ["dirty-log write-protect"]
    kvm.kvm_flush_remote_tlbs()
    assert kvm.tlb_flush_debt == [] and kvm.tlb_flush_debt_deferred == []


def test_an_unpaid_flush_debt_fails_the_unlock_check() -> None:
    """Model: the checker's flush_debt_paid_at_unlock runs at every Kvm.mmu_unlock()."""
    kvm, checker = new_vm("tdp")
    kvm.owe_flush("zap")
    with pytest.raises(InvariantViolation, match="flush_debt_paid_at_unlock"):
        kvm.mmu_unlock("test")
    kvm.kvm_flush_remote_tlbs()
    kvm.mmu_unlock("test")
    assert checker.unlock_checks == 2


def test_a_deferred_debt_may_cross_an_unlock_but_not_a_return_to_userspace() -> None:
    """Model: dirty-logging W/D clears are flushed before the ioctl returns (flush_debt_paid_at_return)."""
    kvm, checker = new_vm("tdp")
    kvm.owe_flush("dirty-log write-protect", deferred=True)
    kvm.mmu_unlock("test")
    with pytest.raises(InvariantViolation, match="flush_debt_paid_at_return"):
        checker.after_operation()


def test_a_guest_tlb_flush_empties_only_that_vcpus_tlb() -> None:
    """kvm_vcpu_flush_tlb_guest(): the vCPU's own TLB, counted in its tlb_flush stat."""
    kvm = Kvm.create("tdp", nr_vcpus=2)
    _fill(kvm)
    kvm_vcpu_flush_tlb_guest(kvm.vcpus[0])
    assert not kvm.vcpus[0].tlb.leaves and kvm.vcpus[1].tlb.leaves
    assert kvm.vcpus[0].stat.tlb_flush == 1
    assert kvm.stat.remote_tlb_flush_requests == 0


def test_spte_to_child_sp_of_a_pfn_that_is_no_table_is_a_kernel_bug() -> None:
    """spte_to_child_sp(): a non-leaf SPTE must point at a live page table."""
    kvm = Kvm.create("tdp")
    with pytest.raises(KvmBugOn, match="spte_to_child_sp"):
        kvm.spte_to_child_sp(make_nonleaf_spte(kvm.masks, kvm.alloc_page_table_pfn(), False))


def test_a_vcpu_in_guest_mode_uses_the_guest_mmu() -> None:
    """vcpu->arch.mmu is guest_mmu while L2 runs (nested EPT), with a guest_mode root role."""
    kvm = Kvm.create("tdp")
    vcpu = kvm.vcpus[0]
    vcpu.guest_mode = True
    assert vcpu.mmu is vcpu.guest_mmu
    assert mmu.mmu_root_role(kvm, vcpu).guest_mode
