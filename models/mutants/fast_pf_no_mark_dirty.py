"""Fix a write-protected SPTE in fast_page_fault() without marking the gfn dirty.

Breaks dirty_log_records_every_write: under dirty logging every 4K SPTE is
write-protected but still MMU-writable, so the first guest write to each
page is fixed by the lockless fast path; fast_pf_fix_direct_spte() calls
mark_page_dirty_in_slot() because nothing else will see that write.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup from the "logging" focus (slot 0 logged), then an L1 guest write into
# slot 0, which fast_page_fault() fixes.
STATED_TRACE = StatedTrace(setup={"focus": "logging"}, rules=[("kvm_vcpu_run", (0, 0, "write"))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="logging")


class Mutant(MergedSplit):
    name = "mutants/fast_pf_no_mark_dirty"
    kernel_patches = (
        during("kvmsplit.mmu.fast_page_fault", "kvmsplit.mmu.mark_page_dirty_in_slot", lambda slot, gfn: None),
    )


MODEL = Mutant()
