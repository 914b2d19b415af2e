"""Never free the shadow pages kvm_mmu_commit_zap_page() takes off the invalid list.

Breaks live_pages_are_reachable: a zapped page is unlinked from its parents
and taken off active_mmu_pages by kvm_mmu_prepare_zap_page(); if the commit
does not free it, it is a page table nothing can reach, and its memory is
lost until the VM is destroyed.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import KernelPatch
from kvmsplit.split import MergedSplit

# setup alone, when it ends with KVM_SET_NR_MMU_PAGES just above what is in
# use after the guest linked a new table: the next shadow page recycles
# (zaps) the oldest.  Any zap of a shadow page exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "unsync", "plan": (0, 0, 0, "none", 4)})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/commit_zap_leaks_page"
    kernel_patches = (KernelPatch("kvmsplit.shadow_mmu.kvm_mmu_free_shadow_page", lambda orig: lambda kvm, sp: None),)


MODEL = Mutant()
