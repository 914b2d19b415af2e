"""Fix a write-protected SPTE in fast_page_fault() without marking the gfn dirty.

Breaks dirty_log_records_every_write: under dirty logging every 4K SPTE is
write-protected but still MMU-writable, so the first guest write to each
page is fixed by the lockless fast path; fast_pf_fix_direct_spte() calls
mark_page_dirty_in_slot() because nothing else will see that write.
"""

from kvmsplit.mutation import during
from kvmsplit.split import MergedSplit

# setup, kvm_mmu_slot_apply_flags(), a guest write into the logged slot.
SHORTEST_TRACE = 3


class Mutant(MergedSplit):
    name = "mutants/fast_pf_no_mark_dirty"
    kernel_patches = (
        during("kvmsplit.mmu.fast_page_fault", "kvmsplit.mmu.mark_page_dirty_in_slot", lambda slot, gfn: None),
    )


MODEL = Mutant()
