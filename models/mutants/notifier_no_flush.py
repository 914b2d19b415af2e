"""Drop the flush the MMU notifier owes after zapping SPTEs.

Breaks flush_debt_paid_at_unlock: kvm_unmap_gfn_range() returns whether it
zapped anything, and kvm_mmu_notifier_invalidate_range_start() must flush
before mmu_lock is dropped, or a vCPU keeps using a page the host is about
to free.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import KernelPatch
from kvmsplit.split import MergedSplit

# setup, then kvm_mmu_notifier() freeing part of a mapped frame.
STATED_TRACE = StatedTrace(rules=[("kvm_mmu_notifier", (0, "dontneed"))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


def _no_flush(orig):  # type: ignore[no-untyped-def]
    def kvm_unmap_gfn_range(kvm, slot, start, end):  # type: ignore[no-untyped-def]
        orig(kvm, slot, start, end)
        return False

    return kvm_unmap_gfn_range


class Mutant(MergedSplit):
    name = "mutants/notifier_no_flush"
    kernel_patches = (KernelPatch("kvmsplit.mmu.kvm_unmap_gfn_range", _no_flush),)


MODEL = Mutant()
