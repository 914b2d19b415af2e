"""Give the shadow MMU's split page a role without guest_mode.

Breaks child_role_matches_parent: the split page must have exactly the role
kvm_mmu_child_role() derives from the huge SPTE's page, or a later fault
through the same parent looks up (and allocates) a different page for the
same gfn, and the split page is never found again.
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
    name = "mutants/split_child_role_drops_guest_mode"

    def shadow_mmu_get_sp_for_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        huge_sp, index = huge_sptep.sp, huge_sptep.index
        gfn = kvm_mmu_page_get_gfn(huge_sp, index)
        role = kvm_mmu_child_role(huge_sp, index, True, kvm_mmu_page_get_access(huge_sp, index))
        role = role.evolve(guest_mode=False)
        caches = split_caches(kvm)
        return shadow_mmu.kvm_mmu_get_shadow_page(kvm, None, gfn, role, (caches.page_header, caches.shadow_page))


MODEL = Mutant()
