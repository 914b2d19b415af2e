"""Refuse only below KVM_MIN_FREE_MMU_PAGES (< instead of <=), so a split can leave 4 free.

Breaks split_keeps_min_free_pages.
"""

from typing import Any

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit

# setup from the "logging" focus, its KVM_SET_NR_MMU_PAGES leaving exactly
# KVM_MIN_FREE_MMU_PAGES available before dirty logging starts.
STATED_TRACE = StatedTrace(setup={"focus": "logging", "plan": (0, 0, 0, "none", 5)})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="logging")


class Mutant(MergedSplit):
    name = "mutants/split_guard_lt"

    def split_lacks_free_mmu_pages(self, available_pages: Any) -> Any:
        from kvmsplit.kvm import KVM_MIN_FREE_MMU_PAGES

        return available_pages < KVM_MIN_FREE_MMU_PAGES


MODEL = Mutant()
