"""Link the new child page without recording the parent pointer.

Breaks parent_ptes_match_links.
"""

from kvmsplit import shadow_mmu
from kvmsplit.split import MergedSplit
from kvmsplit.spte import make_nonleaf_spte

# setup, then kvm_mmu_slot_apply_flags() (the state machine shrinks to this).
SHORTEST_TRACE = 2


class Mutant(MergedSplit):
    name = "mutants/split_no_parent_pte"

    def link_split_page(self, kvm, huge_sptep, sp, flush):  # type: ignore[no-untyped-def]
        shadow_mmu.drop_large_spte(kvm, huge_sptep, flush)
        shadow_mmu.mmu_spte_set(kvm, huge_sptep, make_nonleaf_spte(kvm.masks, sp.pfn, sp.role.ad_disabled))


MODEL = Mutant()
