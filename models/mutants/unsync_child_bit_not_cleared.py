"""Decrement unsync_children without clearing the child's bit in unsync_child_bitmap.

Breaks unsync_children_counted: mmu_unsync_walk() follows the bitmap and
kvm_mmu_sync_roots() trusts the count; when they disagree a resync either
misses an unsync page or walks a child that is already in sync.
"""

from kvmsplit.machine import Hunt, StatedTrace
from kvmsplit.mutation import KernelPatch
from kvmsplit.split import MergedSplit

# setup (shadow paging) with the "unsync" focus (a shadowed 4K guest table the
# guest then wrote, so it is unsync), then a guest TLB flush that resyncs it.
STATED_TRACE = StatedTrace(mmu="shadow", setup={"focus": "unsync"}, rules=[("kvm_guest_tlb_flush", (0,))])
SHORTEST_TRACE = STATED_TRACE.steps
# Where the ci-profile state machine finds it (tests/quality, benchmarks/bench_machine.py).
HUNT = Hunt(focus="unsync")


def _keep_bit(orig):  # type: ignore[no-untyped-def]
    def clear_unsync_child_bit(sp, index):  # type: ignore[no-untyped-def]
        bitmap = sp.unsync_child_bitmap
        orig(sp, index)
        sp.unsync_child_bitmap = bitmap

    return clear_unsync_child_bit


class Mutant(MergedSplit):
    name = "mutants/unsync_child_bit_not_cleared"
    kernel_patches = (KernelPatch("kvmsplit.shadow_mmu.clear_unsync_child_bit", _keep_bit),)


MODEL = Mutant()
