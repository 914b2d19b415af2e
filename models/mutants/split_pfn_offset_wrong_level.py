"""Compute a child's pfn offset with the parent's level (index * pages per huge page).

The gfn to pfn mapping no longer survives the split.  Breaks
tlb_translations_allowed_at_unlock (a cached huge translation disagrees).
"""

from kvmsplit.split import MergedSplit
from kvmsplit.spte import KVM_PAGES_PER_HPAGE, PAGE_SHIFT

# setup, then kvm_mmu_slot_apply_flags() (the state machine shrinks to this).
SHORTEST_TRACE = 2


class Mutant(MergedSplit):
    name = "mutants/split_pfn_offset_wrong_level"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        right = (index * KVM_PAGES_PER_HPAGE(sp.role.level)) << PAGE_SHIFT
        wrong = (index * KVM_PAGES_PER_HPAGE(sp.role.level + 1)) << PAGE_SHIFT
        return (child & ~right) | wrong if index else child


MODEL = Mutant()
