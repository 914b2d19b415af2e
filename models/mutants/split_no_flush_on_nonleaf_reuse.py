"""Drop the flush when a reused child page holds a present non-leaf entry.

The question of v3 22/23's comment ("we must flush the TLB"): installing a
partly filled lower table unmaps part of the huge page, and a vCPU may still
cache the huge translation.  Breaks tlb_translations_allowed_at_unlock.
"""

from kvmsplit.split import MergedSplit

# The directed test in tests/quality: two EPT aliases of one 1G page, which the
# state machine cannot build yet (it edits 2M-level entries only).
SHORTEST_TRACE = 9


class Mutant(MergedSplit):
    name = "mutants/split_no_flush_on_nonleaf_reuse"

    def reused_child_needs_flush(self, child_spte: int, child_level: int) -> bool:
        return False


MODEL = Mutant()
