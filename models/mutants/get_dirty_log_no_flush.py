"""Return from KVM_GET_DIRTY_LOG without flushing the TLBs it re-protected.

Breaks flush_debt_paid_at_return: kvm_get_dirty_log_protect() write-protects
every page it reports, and a vCPU that still caches the writable
translation writes on without faulting, so the next harvest misses the
write.  The flush may wait until mmu_lock is dropped, but not until the
ioctl returns.
"""

from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup, kvm_mmu_slot_apply_flags(), a guest write, kvm_get_dirty_log().
SHORTEST_TRACE = 4


class Mutant(MergedSplit):
    name = "mutants/get_dirty_log_no_flush"
    kernel_patches = (
        during("kvmsplit.x86.kvm_get_dirty_log", "kvmsplit.kvm.Kvm.kvm_flush_remote_tlbs_memslot", lambda *a, **k: None),
    )


MODEL = Mutant()
