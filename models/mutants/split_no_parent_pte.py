"""Link the new child page without recording the parent pointer.

Breaks parent_ptes_match_links.
"""

from kvmsplit import shadow_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import make_nonleaf_spte

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_no_parent_pte"

    def link_split_page(self, kvm, huge_sptep, sp, flush):  # type: ignore[no-untyped-def]
        shadow_mmu.drop_large_spte(kvm, huge_sptep, flush)
        shadow_mmu.mmu_spte_set(kvm, huge_sptep, make_nonleaf_spte(kvm.masks, sp.pfn, sp.role.ad_disabled))


MODEL = Mutant()
