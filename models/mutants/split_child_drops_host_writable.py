"""Build the TDP MMU's split children without Host-writable, keeping W and MMU-writable.

Breaks leaf_spte_writable_triad: a child that is MMU-writable but not
Host-writable lets a later fast page fault make writable a page the host
mapped read-only.  make_huge_page_split_spte() copies every software bit of
the huge SPTE for exactly this reason.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.split import MergedSplit

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_child_drops_host_writable"

    def make_huge_page_split_spte(self, kvm, huge_spte, sp, index):  # type: ignore[no-untyped-def]
        child = super().make_huge_page_split_spte(kvm, huge_spte, sp, index)
        if not sp.tdp_mmu_page:
            # The shadow MMU's mmu_spte_set() WARNs at once; the TDP MMU's
            # plain stores into an unlinked table leave it to the invariant.
            return child
        return child & ~kvm.masks.shadow_host_writable_mask


MODEL = Mutant()
