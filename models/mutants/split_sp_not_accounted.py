"""Leave a shadow page allocated for a split out of n_used_mmu_pages.

Breaks mmu_pages_accounted: the KVM_MIN_FREE_MMU_PAGES guard and
make_mmu_pages_available() both read n_used_mmu_pages, so a split page that
is not accounted lets the shadow MMU grow past KVM_SET_NR_MMU_PAGES
unnoticed.  Allocating split pages through the fault path's
kvm_mmu_get_shadow_page() (Sean Christopherson's review of v3) keeps the
accounting in one place.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_sp_not_accounted"

    def shadow_mmu_get_sp_for_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        before = kvm.stat.mmu_cache_miss
        sp = super().shadow_mmu_get_sp_for_split(kvm, huge_sptep)
        if kvm.stat.mmu_cache_miss != before:
            kvm.n_used_mmu_pages -= 1
        return sp


MODEL = Mutant()
