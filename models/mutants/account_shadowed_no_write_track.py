"""Shadow an upper-level guest table without write-tracking its gfn.

Breaks shadowed_gfns_write_protected: account_shadowed() write-tracks every
guest table above 4K that a shadow page mirrors, so a guest store into it
traps and kvm_mmu_track_write() zaps the stale shadow page; untracked, the
guest edits its page table and the shadow page keeps the old translation.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup (shadow paging): building the guest's first shadow pages is enough.
STATED_TRACE = StatedTrace(mmu="shadow")
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/account_shadowed_no_write_track"
    kernel_patches = (
        during("kvmsplit.shadow_mmu.account_shadowed", "kvmsplit.shadow_mmu._kvm_write_track_add_gfn", lambda *a: None),
    )


MODEL = Mutant()
