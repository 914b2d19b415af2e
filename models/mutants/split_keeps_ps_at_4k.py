"""Leave PS set in 4K children (make_huge_page_split_spte() without the PS clear).

Breaks leaf_size_matches_level.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import PG_LEVEL_4K, PT_PAGE_SIZE_MASK

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_keeps_ps_at_4k"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        return child | PT_PAGE_SIZE_MASK if sp.role.level == PG_LEVEL_4K else child


MODEL = Mutant()
