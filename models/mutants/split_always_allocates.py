"""Allocate a fresh page for every shadow MMU split instead of reusing an existing one.

Breaks shadow_page_hash_unique: kvm_mmu_get_shadow_page() first looks for a
page with the same gfn and role (point 3 of the series' cover letter:
splitting may reuse an existing lower-level page), because two valid pages
for one (gfn, role) make every later lookup pick one of them and leave the
other stale.
"""

from kvmsplit import shadow_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mmu_page import kvm_mmu_child_role, kvm_mmu_page_get_access, kvm_mmu_page_get_gfn
from kvmsplit.split import MergedSplit, split_caches

# setup with the "alias" focus (two L2 aliases of one L1 2M page, both huge),
# then kvm_mmu_slot_apply_flags(): the second split must reuse the first's page.
STATED_TRACE = StatedTrace(setup={"focus": "alias"}, rules=[("kvm_mmu_slot_apply_flags", ())])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="alias")


class Mutant(MergedSplit):
    name = "mutants/split_always_allocates"

    def shadow_mmu_get_sp_for_split(self, kvm, huge_sptep):  # type: ignore[no-untyped-def]
        huge_sp, index = huge_sptep.sp, huge_sptep.index
        gfn = kvm_mmu_page_get_gfn(huge_sp, index)
        role = kvm_mmu_child_role(huge_sp, index, True, kvm_mmu_page_get_access(huge_sp, index))
        caches = split_caches(kvm)
        kvm.stat.mmu_cache_miss += 1
        return shadow_mmu.kvm_mmu_alloc_shadow_page(kvm, gfn, role, (caches.page_header, caches.shadow_page))


MODEL = Mutant()
