"""Key a TDP MMU split table by the first gfn to split instead of the first gfn it maps.

Breaks direct_page_gfn_aligned: tdp_mmu_init_child_sp() takes the child's
gfn from iter->gfn, the huge SPTE's own aligned gfn.  A split asked for a
range that starts inside a huge page (KVM_CLEAR_DIRTY_LOG in initially-set
mode splits only the 64 pages of one bitmap word) would otherwise record
the range's start, and every later walk of that table would compute its
gfns from the wrong base.
"""

from kvmsplit import tdp_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import swapped
from kvmsplit.split import MergedSplit

# setup with the "clear" focus (initially-set, logging on), then
# kvm_clear_dirty_log() of a word not at a 2M boundary.
STATED_TRACE = StatedTrace(setup={"focus": "clear"}, rules=[("kvm_clear_dirty_log", (0, 1, [0]))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="clear")

_init_child_sp = tdp_mmu.tdp_mmu_init_child_sp


class Mutant(MergedSplit):
    name = "mutants/tdp_split_child_gfn_unaligned"

    def kvm_tdp_mmu_try_split_huge_pages(self, kvm, slot, start, end, target_level, shared):  # type: ignore[no-untyped-def]
        def init_from_start(sp, it):  # type: ignore[no-untyped-def]
            _init_child_sp(sp, it)
            sp.gfn = max(it.gfn, start)

        with swapped(tdp_mmu, "tdp_mmu_init_child_sp", init_from_start, everywhere=False):
            super().kvm_tdp_mmu_try_split_huge_pages(kvm, slot, start, end, target_level, shared)


MODEL = Mutant()
