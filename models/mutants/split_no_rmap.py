"""Install a child SPTE without its rmap entry (and without counting it).

Breaks rmap_holds_exactly_present_leaves.
"""

from kvmsplit import shadow_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_no_rmap"

    def shadow_mmu_split_huge_page(self, kvm, slot, huge_sptep):  # type: ignore[no-untyped-def]
        real = shadow_mmu.rmap_add
        shadow_mmu.rmap_add = lambda kvm, slot, sptep, gfn, access, cache=None: kvm.kvm_update_page_stats(
            sptep.sp.role.level, 1
        )
        try:
            super().shadow_mmu_split_huge_page(kvm, slot, huge_sptep)
        finally:
            shadow_mmu.rmap_add = real


MODEL = Mutant()
