"""Drop the flush the MMU notifier owes after zapping SPTEs.

Breaks flush_debt_paid_at_unlock: kvm_unmap_gfn_range() returns whether it
zapped anything, and kvm_mmu_notifier_invalidate_range_start() must flush
before mmu_lock is dropped, or a vCPU keeps using a page the host is about
to free.
"""

from kvmsplit.mutation import KernelPatch
from kvmsplit.split import MergedSplit

# setup, then kvm_mmu_notifier() freeing a mapped frame.
SHORTEST_TRACE = 2


def _no_flush(orig):  # type: ignore[no-untyped-def]
    def kvm_unmap_gfn_range(kvm, slot, start, end):  # type: ignore[no-untyped-def]
        orig(kvm, slot, start, end)
        return False

    return kvm_unmap_gfn_range


class Mutant(MergedSplit):
    name = "mutants/notifier_no_flush"
    kernel_patches = (KernelPatch("kvmsplit.mmu.kvm_unmap_gfn_range", _no_flush),)


MODEL = Mutant()
