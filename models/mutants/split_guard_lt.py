"""Refuse only below KVM_MIN_FREE_MMU_PAGES (< instead of <=), so a split can leave 4 free.

Breaks split_keeps_min_free_pages.
"""

from typing import Any

from kvmsplit.split import MergedSplit

# setup (nested huge pages, ending in kvm_mmu_change_mmu_pages(headroom=5)),
# then kvm_mmu_slot_apply_flags().
SHORTEST_TRACE = 2


class Mutant(MergedSplit):
    name = "mutants/split_guard_lt"

    def split_lacks_free_mmu_pages(self, available_pages: Any) -> Any:
        from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES

        return available_pages < KVM_MIN_FREE_MMU_PAGES


MODEL = Mutant()
