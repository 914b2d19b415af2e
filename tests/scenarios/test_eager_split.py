"""Eager page splitting, branch by branch, as the merged kernel takes them.

Each test states the outcome it expects and the kernel function it pins;
every invariant runs after each step and at every mmu_lock release.
"""

from __future__ import annotations

from kvmsplit import mmu, shadow_mmu, tdp_mmu, x86
from kvmsplit.kvm import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MIN_FREE_MMU_PAGES
from kvmsplit.spte import (
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PT_WRITABLE_MASK,
    is_executable_pte,
    is_large_pte,
    is_shadow_present_pte,
)
from tests.helpers import EptBuilder, GiB, MiB, add_slot, new_vm, run, set_logging

INIT_SET = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET


def nested_vm_with_aliases(n_aliases: int = 2, size: int = 2 * MiB):
    """L2 sees the same 2M of L1 memory at @n_aliases places, each mapped by a guest 2M page."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 8 * MiB, "thp")
    ept = EptBuilder(kvm)
    for a in range(n_aliases):
        ept.map_range(a * 64 * MiB, 0, size, PG_LEVEL_2M)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    for a in range(n_aliases):
        run(kvm, checker, 0, a * 64 * MiB, a * 64 * MiB + size, 2 * MiB)
    return kvm, checker


def test_split_reuses_a_child_page_with_only_leaves_without_a_flush() -> None:
    """shadow_mmu_split_huge_page(): the second alias finds the first's direct page, full of leaves: no flush."""
    kvm, checker = nested_vm_with_aliases(2)
    assert kvm.stat.pages_2m == 2 and kvm.stat.pages_4k == 0
    flushes, misses = kvm.stat.remote_tlb_flush_requests, kvm.stat.mmu_cache_miss
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["shadow_split_2m"] == 2
    assert events["reuse"] == 1
    assert events["reuse_nonleaf_flush"] == 0
    # One new page for both splits; the reused page had no empty entry, so k = 0 for it.
    assert kvm.stat.mmu_cache_miss == misses + 1
    assert kvm.stat.pages_2m == 0 and kvm.stat.pages_4k == 512
    # Only kvm_mmu_slot_apply_flags()'s memslot flush.
    assert kvm.stat.remote_tlb_flush_requests == flushes + 1


def test_split_reusing_a_page_with_a_present_nonleaf_child_flushes() -> None:
    """A reused page whose entry points at a partly filled table unmaps part of the huge page: flush."""
    kvm, checker = new_vm("tdp")
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, INIT_SET)
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    ept = EptBuilder(kvm)
    l1_gfn = GiB >> 12
    ept.map(0, l1_gfn, PG_LEVEL_1G)  # alias A
    ept.map(GiB, l1_gfn, PG_LEVEL_1G)  # alias B
    x86.nested_vmx_enter(kvm, 0, ept.root)
    # Alias B faults while logging is on: 4K, through direct level-2 and level-1 pages.
    set_logging(kvm, 0, True)
    run(kvm, checker, 0, GiB, GiB + 1, 4096)
    assert kvm.stat.pages_4k == 1
    # Logging off: the 4K leaf is zapped, its (now empty) table stays linked.
    set_logging(kvm, 0, False)
    checker.after_operation()
    assert kvm.stat.pages_4k == 0
    # Alias A maps the whole gigabyte with one 1G SPTE, and the TLB caches it.
    run(kvm, checker, 0, 0, 1, 4096)
    assert kvm.stat.pages_1g == 1
    set_logging(kvm, 0, True)
    flushes = kvm.stat.remote_tlb_flush_requests
    # The first KVM_CLEAR_DIRTY_LOG splits the huge page covering the cleared gfns.
    x86.kvm_clear_dirty_log(kvm, 0, 0, 64, (1).to_bytes(8, "little"))
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["shadow_split_1g"] == 1
    assert events["reuse"] >= 1
    assert events["reuse_nonleaf_flush"] == 1
    assert kvm.stat.pages_1g == 0
    # The reused page kept its non-leaf entry: 511 new 2M children, not 512.
    assert kvm.stat.pages_2m == 511
    # drop_large_spte(flush=true), then the CLEAR path's memslot flush.
    assert kvm.stat.remote_tlb_flush_requests == flushes + 2


def nested_vm_with_huge_pages(n: int):
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, n * 2 * MiB, "thp")
    ept = EptBuilder(kvm)
    ept.map_range(0, 0, n * 2 * MiB, PG_LEVEL_2M)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, n * 2 * MiB, 2 * MiB)
    assert kvm.stat.pages_2m == n
    return kvm, checker


def test_split_refuses_with_enospc_at_exactly_min_free_pages() -> None:
    """shadow_mmu_try_split_huge_page(): available <= KVM_MIN_FREE_MMU_PAGES (5) is -ENOSPC."""
    kvm, checker = nested_vm_with_huge_pages(3)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + KVM_MIN_FREE_MMU_PAGES)
    assert kvm.kvm_mmu_available_pages() == 5
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["enospc"] == 3  # one per rmap head, each stopped at once
    assert events["shadow_split_2m"] == 0
    assert kvm.kvm_mmu_available_pages() == 5
    # The huge pages that failed to split are write-protected (the enable path).
    assert kvm.stat.pages_2m == 3


def test_split_proceeds_at_six_available_pages_and_stops_at_five() -> None:
    """One split takes one page: at 6 available the first split runs, then -ENOSPC."""
    kvm, checker = nested_vm_with_huge_pages(3)
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + KVM_MIN_FREE_MMU_PAGES + 1)
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["shadow_split_2m"] == 1
    assert events["enospc"] == 2
    assert kvm.kvm_mmu_available_pages() == KVM_MIN_FREE_MMU_PAGES
    assert kvm.stat.pages_2m == 2 and kvm.stat.pages_4k == 512


def test_repeated_eagain_drops_the_lock_and_makes_progress_eventually() -> None:
    """need_resched() forces -EAGAIN (lock dropped, no state change) until it clears."""
    kvm, checker = nested_vm_with_huge_pages(2)
    kvm.model_split_env.need_resched = [True] * 10
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    # The first forced -EAGAIN also tops up the empty caches.
    assert events["eagain"] == 10
    assert events["shadow_split_2m"] == 2
    assert kvm.stat.pages_2m == 0 and kvm.stat.pages_4k == 1024


def test_enomem_stops_only_the_current_rmap_head() -> None:
    """A failed top-up (-ENOMEM) breaks out of one rmap head; the next head tries again."""
    kvm, checker = nested_vm_with_huge_pages(3)
    kvm.model_split_env.topup_fails = [True]
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["enomem"] == 1
    assert events["shadow_head_stopped"] == 1
    assert events["shadow_split_2m"] == 2
    assert kvm.stat.pages_2m == 1


def tdp_vm_with_huge_pages(n: int):
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, n * 2 * MiB, "thp")
    run(kvm, checker, 0, 0, n * 2 * MiB, 2 * MiB)
    assert kvm.stat.pages_2m == n
    return kvm, checker


def test_tdp_enomem_stops_the_whole_walk() -> None:
    """kvm_tdp_mmu_try_split_huge_pages(): -ENOMEM ends this root and every remaining one."""
    kvm, checker = tdp_vm_with_huge_pages(3)
    kvm.model_split_env.tdp_alloc_fails = [False, True]
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["tdp_split_2m"] == 1
    assert events["enomem"] == 1
    assert events["tdp_roots_stopped"] == 1
    assert kvm.stat.pages_2m == 2


def test_tdp_lost_race_to_a_hardware_dirty_bit_retries_from_the_new_value() -> None:
    """A hardware A-bit update between read and cmpxchg: retry, children built from the new value."""
    kvm, checker = tdp_vm_with_huge_pages(1)
    a = kvm.masks.shadow_accessed_mask
    # The host ages the page (clear_young): the huge SPTE loses its A bit.
    assert mmu.kvm_mmu_notifier_clear_young(kvm, kvm.slot(0).userspace_addr, kvm.slot(0).userspace_addr + 2 * MiB)
    raced = []

    def race(k, it) -> None:
        if not raced and is_large_pte(it.old_spte):
            raced.append(it.gfn)
            assert not it.old_spte & a
            it.sptep.sp.spt[it.sptep.index] = it.old_spte | a

    kvm.model_tdp_race = race
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.model_split_env.events["tdp_race_lost"] == 1
    assert kvm.model_split_env.events["tdp_split_2m"] == 1
    root = kvm.tdp_mmu_roots[0]
    leaves = [s for s in mmu.shadow_walk(kvm, root, 0x5000)]
    assert leaves[-1].sp.role.level == 1 and leaves[-1].spte & a


def test_tdp_lost_race_to_a_zap_skips_the_entry() -> None:
    """A concurrent zap between read and cmpxchg: the SPTE is no longer a huge leaf, so skip it."""
    kvm, checker = tdp_vm_with_huge_pages(2)
    raced = []

    def race(k, it) -> None:
        if not raced and is_large_pte(it.old_spte):
            raced.append(it.gfn)
            old = it.sptep.spte
            it.sptep.sp.spt[it.sptep.index] = 0
            tdp_mmu.handle_changed_spte(k, it.gfn, old, 0, it.level, True)
            k.kvm_flush_remote_tlbs("racing zap")

    kvm.model_tdp_race = race
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["tdp_race_lost"] == 1
    assert events["tdp_split_2m"] == 1
    assert kvm.stat.pages_2m == 0 and kvm.stat.pages_4k == 512


def test_tdp_splits_1g_to_2m_to_4k_in_one_enable() -> None:
    """The pre-order walk splits a 1G page and then its new 2M children in one pass."""
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    run(kvm, checker, 0, GiB, GiB + 1, 4096)
    assert kvm.stat.pages_1g == 1
    set_logging(kvm, 0, True)
    checker.after_operation()
    events = kvm.model_split_env.events
    assert events["tdp_split_1g"] == 1 and events["tdp_split_2m"] == 512
    assert (kvm.stat.pages_1g, kvm.stat.pages_2m, kvm.stat.pages_4k) == (0, 0, 512 * 512)
    assert kvm.tdp_mmu_pages == 1 + 1 + 512  # the 512G-level table, the 1G table, 512 tables of 4K


def test_shadow_splits_every_1g_page_before_any_2m_page() -> None:
    """kvm_shadow_mmu_try_split_huge_pages(): the 1G pass, then the 2M pass over the new 2M pages."""
    kvm, checker = new_vm("tdp")
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, INIT_SET)
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    ept = EptBuilder(kvm)
    ept.map(0, GiB >> 12, PG_LEVEL_1G)
    x86.nested_vmx_enter(kvm, 0, ept.root)
    run(kvm, checker, 0, 0, 1, 4096)
    assert kvm.stat.pages_1g == 1
    set_logging(kvm, 0, True)
    order = []
    kvm.flush_hooks.append(lambda k, why: None)
    policy = type(kvm.model_split_policy or __import__("kvmsplit.split").split.MERGED)
    original = policy.shadow_mmu_split_huge_page

    def spy(self, k, slot, huge_sptep):
        order.append(huge_sptep.sp.role.level)
        return original(self, k, slot, huge_sptep)

    policy.shadow_mmu_split_huge_page = spy  # type: ignore[method-assign]
    try:
        # Clear two words: the 1G page splits, then the two 2M pages covering them.
        mask = (1).to_bytes(8, "little") + bytes(4096 // 8 - 8) + (1).to_bytes(8, "little")
        x86.kvm_clear_dirty_log(kvm, 0, 0, 4096 + 64, mask[: (4096 + 64) // 8])
    finally:
        policy.shadow_mmu_split_huge_page = original  # type: ignore[method-assign]
    checker.after_operation()
    # The huge SPTE's owner level: 3 for the 1G page, then 2 for each 2M page.
    assert order == [3, 2, 2]
    assert (kvm.stat.pages_1g, kvm.stat.pages_2m, kvm.stat.pages_4k) == (0, 510, 1024)


def test_nx_mitigation_gives_exec_back_at_4k_but_not_at_2m() -> None:
    """make_huge_page_split_spte(): 4K children of an NX huge page become executable, 2M ones stay NX."""
    kvm, checker = new_vm("tdp", nx_huge_pages=True)
    x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, INIT_SET)
    add_slot(kvm, 0, GiB, GiB, "hugetlb-1g")
    run(kvm, checker, 0, GiB, GiB + 1, 4096)
    assert kvm.stat.pages_1g == 1
    set_logging(kvm, 0, True)
    x86.kvm_clear_dirty_log(kvm, 0, 0, 64, (1).to_bytes(8, "little"))
    checker.after_operation()
    root = kvm.tdp_mmu_roots[0]
    four_k = mmu.shadow_walk(kvm, root, GiB)[-1]
    two_m = mmu.shadow_walk(kvm, root, GiB + 64 * MiB)[-1]
    assert four_k.sp.role.level == 1 and is_shadow_present_pte(four_k.spte)
    assert two_m.sp.role.level == 2 and is_large_pte(two_m.spte)
    assert is_executable_pte(kvm.masks, four_k.spte)
    assert not is_executable_pte(kvm.masks, two_m.spte)


def test_no_eager_split_without_the_tdp_mmu() -> None:
    """kvm_mmu_slot_try_split_huge_pages() returns at once unless tdp_mmu_enabled."""
    kvm, checker = new_vm("tdp-legacy")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 4 * MiB, 2 * MiB)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages_2m == 2 and not kvm.model_split_env.events
    # ... and the huge pages are write-protected instead.
    root = kvm.vcpus[0].root_mmu.root
    assert not mmu.shadow_walk(kvm, root, 0)[-1].spte & PT_WRITABLE_MASK


def test_eager_page_split_parameter_off_means_lazy_splitting() -> None:
    """eager_page_split=N: nothing splits at enable time; a write splits its own frame."""
    kvm, checker = tdp_vm_with_huge_pages(2)
    x86.set_eager_page_split(kvm, False)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.stat.pages_2m == 2
    run(kvm, checker, 0, 0x3000, 0x3001, 4096, "write")
    # The TDP fault path splits in place: 512 4K SPTEs, no flush.
    assert kvm.stat.pages_2m == 1 and kvm.stat.pages_4k == 512


def test_v3_splits_without_the_tdp_mmu_where_merged_does_not() -> None:
    """The seed patch split with any MMU that had rmaps; the merged code needs the TDP MMU."""
    from kvmsplit.models_registry import load_model

    kvm, checker = new_vm("tdp-legacy")
    kvm.model_split_policy = load_model("v3")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    run(kvm, checker, 0, 0, 4 * MiB, 2 * MiB)
    set_logging(kvm, 0, True)
    checker.after_operation()
    assert kvm.model_split_env.events["shadow_split_2m"] == 2
    assert kvm.stat.pages_2m == 0 and kvm.stat.pages_4k == 1024
