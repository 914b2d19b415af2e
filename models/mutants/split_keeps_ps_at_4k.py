"""Leave PS set in 4K children (make_huge_page_split_spte() without the PS clear).

Breaks leaf_size_matches_level.
"""

from kvmsplit.split import MergedSplit
from kvmsplit.spte import PG_LEVEL_4K, PT_PAGE_SIZE_MASK

# setup, then kvm_mmu_slot_apply_flags() (the state machine shrinks to this).
SHORTEST_TRACE = 2


class Mutant(MergedSplit):
    name = "mutants/split_keeps_ps_at_4k"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        return child | PT_PAGE_SIZE_MASK if sp.role.level == PG_LEVEL_4K else child


MODEL = Mutant()
