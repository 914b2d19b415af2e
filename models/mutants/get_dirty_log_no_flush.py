"""Return from KVM_GET_DIRTY_LOG without flushing the TLBs it re-protected.

Breaks flush_debt_paid_at_return, and tlb_translations_allowed_strict, its
semantic twin: kvm_get_dirty_log_protect() write-protects
every page it reports, and a vCPU that still caches the writable
translation writes on without faulting, so the next harvest misses the
write.  The flush may wait until mmu_lock is dropped, but not until the
ioctl returns.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup from the "logging" focus (slot 0 logged), an L1 guest write, then
# KVM_GET_DIRTY_LOG on slot 0.
STATED_TRACE = StatedTrace(
    setup={"focus": "logging"}, rules=[("kvm_vcpu_run", (0, 0, "write")), ("kvm_get_dirty_log", (0,))]
)
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/get_dirty_log_no_flush"
    kernel_patches = (
        during(
            "kvmsplit.x86.kvm_get_dirty_log", "kvmsplit.kvm.Kvm.kvm_flush_remote_tlbs_memslot", lambda *a, **k: None
        ),
    )


MODEL = Mutant()
