"""Account the shadow MMU's split page as an NX huge page candidate.

Breaks split_page_is_not_an_nx_recovery_candidate: a page on
possible_nx_huge_pages is zapped by the NX recovery worker so that a huge
page can come back; a page made by eager splitting replaced a huge page
that was never disallowed, and zapping it would only undo the split.
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
    name = "mutants/split_page_tracked_for_nx_recovery"

    def shadow_mmu_get_sp_for_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        sp = super().shadow_mmu_get_sp_for_split(kvm, huge_sptep)
        if not sp.nx_huge_page_disallowed:
            shadow_mmu.account_nx_huge_page(kvm, sp, True)
        return sp


MODEL = Mutant()
