"""Split huge SPTEs of unsync owners as a policy instead of treating them as impossible,
and let 2M guest tables go unsync (mmu_try_to_unsync_pages() without the 4K rule).

The premise Sean Christopherson's review of v3 22/23 rests on: pages above
4K are write-tracked and never unsync.  Breaks no_unsync_huge_sp.
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
    name = "mutants/split_allows_unsync_owner"

    def skip_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        # Mark the owner unsync as a guest write to an untracked table would.
        sp = huge_sptep.sp
        if not sp.role.direct and not sp.unsync:
            shadow_mmu.kvm_unsync_page(kvm, sp)
        return bool(sp.role.invalid)


MODEL = Mutant()
