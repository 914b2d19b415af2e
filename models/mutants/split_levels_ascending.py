"""Walk the rmaps for 2M pages before 1G pages in the shadow MMU's eager split.

Breaks split_pass_goes_top_down_to_the_target:
kvm_shadow_mmu_try_split_huge_pages() walks from KVM_MAX_HUGEPAGE_LEVEL
down, so the 2M children a 1G split creates are split in the next pass.
Bottom-up, they are created after the 2M pass and stay huge (and, under
dirty logging, only write-protected) until faults split them one by one.
"""

from kvmsplit import shadow_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import KVM_MAX_HUGEPAGE_LEVEL

# setup with the "clear" focus (initially-set, logging on, a 1G page mapped
# for L2), then kvm_clear_dirty_log() on the 1G slot.
STATED_TRACE = StatedTrace(setup={"focus": "clear"}, rules=[("kvm_clear_dirty_log", (2, 0, [0]))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_levels_ascending"

    def kvm_shadow_mmu_try_split_huge_pages(self, kvm, slot, start, end, target_level):  # type: ignore[no-untyped-def]
        for level in range(target_level + 1, KVM_MAX_HUGEPAGE_LEVEL + 1):
            shadow_mmu.walk_slot_rmaps(
                kvm,
                slot,
                lambda k, head, s, gfn, lvl: self.shadow_mmu_try_split_huge_pages(k, head, s),
                level,
                level,
                start,
                end - 1,
            )


MODEL = Mutant()
