"""Refuse only below KVM_MIN_FREE_MMU_PAGES (< instead of <=), so a split can leave 4 free.

Breaks split_keeps_min_free_pages.
"""

from kvmsplit.split import EAGAIN, ENOSPC, MergedSplit, split_env

# setup (nested huge pages), kvm_mmu_change_mmu_pages(headroom=5), kvm_mmu_slot_apply_flags().
SHORTEST_TRACE = 3


class Mutant(MergedSplit):
    name = "mutants/split_guard_lt"

    def shadow_mmu_try_split_huge_page(self, kvm, slot, huge_sptep):  # type: ignore[no-untyped-def]
        from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES

        env = split_env(kvm)
        if kvm.kvm_mmu_available_pages() < KVM_MIN_FREE_MMU_PAGES:
            env.events["enospc"] += 1
            return ENOSPC
        if self.need_topup_split_caches_or_resched(kvm):
            kvm.mmu_unlock("shadow_mmu_try_split_huge_page")
            r = self.topup_split_caches(kvm)
            return r or EAGAIN
        self.shadow_mmu_split_huge_page(kvm, slot, huge_sptep)
        return 0


MODEL = Mutant()
