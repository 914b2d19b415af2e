"""Count all 512 children of a reused page in pages_4k/pages_2m, not only the new ones.

A split of a level-L leaf moves the stats by -1 at L and +k at L-1, where
k is the number of previously empty entries of a reused page (kernel-brief
invariant 22).  Breaks split_moves_page_stats_to_its_children, the
transition form, and then page_stats_count_present_leaves.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import SPTE_ENT_PER_PAGE, is_shadow_present_pte

# setup with the "alias" focus (two L2 aliases of one L1 2M page, both huge),
# then kvm_mmu_slot_apply_flags(): the second split reuses the first's page.
STATED_TRACE = StatedTrace(setup={"focus": "alias"}, rules=[("kvm_mmu_slot_apply_flags", ())])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="alias")


class Mutant(MergedSplit):
    name = "mutants/split_stats_reused_as_fresh"

    def shadow_mmu_split_huge_page(self, kvm, slot, huge_sptep):  # type: ignore[no-untyped-def]
        sp = self.shadow_mmu_get_sp_for_split(kvm, huge_sptep)
        already = sum(1 for i in range(SPTE_ENT_PER_PAGE) if is_shadow_present_pte(sp.spt[i]))
        super().shadow_mmu_split_huge_page(kvm, slot, huge_sptep)
        kvm.kvm_update_page_stats(sp.role.level, already)


MODEL = Mutant()
