"""Drop the flush when a reused child page holds a present non-leaf entry.

The question of v3 22/23's comment ("we must flush the TLB"): installing a
partly filled lower table unmaps part of the huge page, and a vCPU may still
cache the huge translation.  Breaks tlb_translations_allowed_at_unlock.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit

# setup with the "alias_1g" focus (L2 maps the 1G slot huge at 1 GiB and 4K
# at 2 GiB, under initially-set logging), then kvm_clear_dirty_log() on it:
# the split of the 1 GiB alias reuses the 2 GiB alias's page.
STATED_TRACE = StatedTrace(setup={"focus": "alias_1g"}, rules=[("kvm_clear_dirty_log", (2, 0, [0]))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="alias_1g")


class Mutant(MergedSplit):
    name = "mutants/split_no_flush_on_nonleaf_reuse"

    def reused_child_needs_flush(self, child_spte: int, child_level: int) -> bool:
        return False


MODEL = Mutant()
