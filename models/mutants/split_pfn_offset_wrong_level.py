"""Compute a child's pfn offset with the parent's level (index * pages per huge page).

The gfn to pfn mapping no longer survives the split.  Breaks
split_keeps_gfn_to_pfn_mapping (and, later, the TLB checks: a cached huge
translation disagrees with the children).
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import KVM_PAGES_PER_HPAGE, PAGE_SHIFT

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_pfn_offset_wrong_level"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        right = (index * KVM_PAGES_PER_HPAGE(sp.role.level)) << PAGE_SHIFT
        wrong = (index * KVM_PAGES_PER_HPAGE(sp.role.level + 1)) << PAGE_SHIFT
        return (child & ~right) | wrong if index else child


MODEL = Mutant()
