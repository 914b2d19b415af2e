"""After eager splitting, write-protect only 4K SPTEs, trusting the split to have left no huge page.

Breaks dirty_logged_slot_has_no_writable_huge_leaf: a split stops at
-ENOSPC or -ENOMEM and leaves huge pages behind, and
kvm_mmu_slot_apply_flags() relies on kvm_mmu_slot_remove_write_access() to
write-protect those ("huge pages that failed to split" in its comment).
"""

from kvmsplit import mmu, shadow_mmu, tdp_mmu
from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit
from kvmsplit.spte import PG_LEVEL_4K, PT_WRITABLE_MASK, is_shadow_present_pte

# setup from the "logging" focus with the TDP MMU's split allocation failing
# (-ENOMEM), so huge pages stay for the write-protect pass.
STATED_TRACE = StatedTrace(setup={"focus": "logging", "plan": (0, 0, 1, "none", 0)})
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt()


def _wrprot_4k_only(kvm, slot, start_level):  # type: ignore[no-untyped-def]
    if kvm.kvm_memslots_have_rmaps():
        shadow_mmu.walk_slot_rmaps(
            kvm, slot, mmu.slot_rmap_write_protect, PG_LEVEL_4K, PG_LEVEL_4K, slot.base_gfn, slot.end_gfn - 1
        )
        kvm.mmu_unlock("kvm_mmu_slot_remove_write_access rmaps")
    if kvm.tdp_mmu_enabled:
        for root in tdp_mmu.tdp_mmu_roots(kvm, only_valid=True):
            for it in tdp_mmu.for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, slot.base_gfn, slot.end_gfn):
                spte = it.old_spte
                if it.level == PG_LEVEL_4K and is_shadow_present_pte(spte) and spte & PT_WRITABLE_MASK:
                    tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, spte & ~PT_WRITABLE_MASK)
                    kvm.owe_flush("wrprot_gfn_range", deferred=True)
        kvm.mmu_unlock("kvm_mmu_slot_remove_write_access tdp")


class Mutant(MergedSplit):
    name = "mutants/wrprot_skips_unsplit_huge"
    kernel_patches = (
        during(
            "kvmsplit.x86.kvm_mmu_slot_apply_flags", "kvmsplit.mmu.kvm_mmu_slot_remove_write_access", _wrprot_4k_only
        ),
    )


MODEL = Mutant()
