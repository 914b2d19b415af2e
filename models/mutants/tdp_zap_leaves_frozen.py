"""Leave a zapped TDP MMU SPTE frozen (REMOVED_SPTE) instead of clearing it after the flush.

Breaks only_present_leaves_or_mmio_in_tables: tdp_mmu_zap_spte_atomic()
freezes the SPTE so no other thread can install a mapping before the TLB
flush, then must store the non-present value; a frozen SPTE left behind
makes every later fault on that gfn retry forever.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import KernelPatch
from kvmsplit.split import MergedSplit
from kvmsplit.spte import REMOVED_SPTE

# setup from the "logging" focus (eager split to 4K), then stopping dirty
# logging, whose kvm_tdp_mmu_zap_collapsible_sptes() zaps the split tables.
STATED_TRACE = StatedTrace(setup={"focus": "logging"}, rules=[("kvm_mmu_slot_apply_flags_stop", (0,))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


def _stay_frozen(orig):  # type: ignore[no-untyped-def]
    def tdp_mmu_zap_spte_atomic(kvm, it):  # type: ignore[no-untyped-def]
        ret = orig(kvm, it)
        if not ret:
            it.sptep.sp.spt[it.sptep.index] = REMOVED_SPTE
        return ret

    return tdp_mmu_zap_spte_atomic


class Mutant(MergedSplit):
    name = "mutants/tdp_zap_leaves_frozen"
    kernel_patches = (KernelPatch("kvmsplit.tdp_mmu.tdp_mmu_zap_spte_atomic", _stay_frozen),)


MODEL = Mutant()
