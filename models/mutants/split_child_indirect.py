"""Give the split's child page an indirect role, as if it shadowed a guest table.

The merged code always asks for a direct child (kvm_mmu_child_role(...,
direct=true, ...) in shadow_mmu_get_sp_for_split()): the huge region is
mapped directly by smaller pages.  Breaks leaf_maps_the_host_pfn_of_its_gfn:
an indirect page records the translations its entries shadow, and the split
records none, so its leaves no longer say which gfn they map.
"""

from kvmsplit import shadow_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mmu_page import kvm_mmu_child_role, kvm_mmu_page_get_access, kvm_mmu_page_get_gfn
from kvmsplit.split import MergedSplit, split_caches

# setup from the "logging" focus: dirty logging starts on slot 0 and the eager
# split of its huge pages exposes it.
STATED_TRACE = StatedTrace(setup={"focus": "logging"})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


class Mutant(MergedSplit):
    name = "mutants/split_child_indirect"

    def shadow_mmu_get_sp_for_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        huge_sp, index = huge_sptep.sp, huge_sptep.index
        gfn = kvm_mmu_page_get_gfn(huge_sp, index)
        role = kvm_mmu_child_role(huge_sp, index, False, kvm_mmu_page_get_access(huge_sp, index))
        caches = split_caches(kvm)
        return shadow_mmu.kvm_mmu_alloc_shadow_page(kvm, gfn, role, (caches.page_header, caches.shadow_page))


MODEL = Mutant()
