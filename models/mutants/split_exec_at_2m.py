"""Grant exec to 2M children of an NX-mitigated 1G page (exec restored at the wrong level).

Breaks nx_huge_page_not_executable.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit
from kvmsplit.spte import PG_LEVEL_2M, make_spte_executable

# setup with the "clear" focus and the NX mitigation (initially-set, logging
# on, the 1G slot mapped huge), then kvm_clear_dirty_log() on the 1G slot.
STATED_TRACE = StatedTrace(setup={"nx": True, "focus": "clear"}, rules=[("kvm_clear_dirty_log", (2, 0, [0]))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_exec_at_2m"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        if sp.role.level == PG_LEVEL_2M and kvm.is_nx_huge_page_enabled():
            child = make_spte_executable(kvm.masks, child)
        return child


MODEL = Mutant()
