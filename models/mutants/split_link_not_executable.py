"""Link the shadow MMU's split page with a non-executable SPTE.

Breaks nonleaf_spte_points_at_child_table: a non-leaf SPTE must grant every
access (make_nonleaf_spte()), because permissions are enforced at the
leaves; a link that withholds exec makes every 4K child fault on
instruction fetch, over and over, although the child itself allows it.
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
    name = "mutants/split_link_not_executable"

    def link_split_page(self, kvm, huge_sptep, sp, flush):  # type: ignore[no-untyped-def]
        super().link_split_page(kvm, huge_sptep, sp, flush)
        m = kvm.masks
        spte = huge_sptep.sp.spt[huge_sptep.index]
        huge_sptep.sp.spt[huge_sptep.index] = (spte & ~m.shadow_x_mask) | m.shadow_nx_mask


MODEL = Mutant()
