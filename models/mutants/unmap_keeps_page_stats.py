"""Zap SPTEs for the MMU notifier without taking them off the page stats.

Breaks page_stats_count_present_leaves: pages_4k, pages_2m and pages_1g are
what userspace (and the dirty_log_page_splitting selftest) reads to see
whether huge pages were split or rebuilt; every path that clears a present
leaf must go through kvm_update_page_stats(), the notifier's zaps included.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup, then kvm_mmu_notifier() freeing part of a mapped frame.
STATED_TRACE = StatedTrace(rules=[("kvm_mmu_notifier", (0, "dontneed"))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/unmap_keeps_page_stats"
    kernel_patches = (
        during("kvmsplit.mmu.kvm_unmap_gfn_range", "kvmsplit.kvm.Kvm.kvm_update_page_stats", lambda *a: None),
    )


MODEL = Mutant()
