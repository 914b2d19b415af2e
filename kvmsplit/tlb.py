"""Model: per-vCPU TLBs and paging-structure caches (no kernel twin).

A vCPU's TLB caches what a guest access actually walked: the leaf
translation (its level, the pfn it maps and the rights it granted) and the
non-leaf entries along the way (which table each pointed at).  KVM's remote
flushes empty it; nothing else does, except the guest's own flushes and a
root switch.  Checks can then ask semantically "is every translation a vCPU
still caches allowed by the SPTEs now?" instead of trusting a flush flag.

Keys are (mmu context, level, address >> level shift): the address is a gpa
for a direct MMU, a gva or an L2 gpa for a shadow MMU.
"""

from __future__ import annotations

import attrs

from kvmsplit.spte import KVM_HPAGE_GFN_SHIFT, PAGE_SHIFT


@attrs.frozen
class TlbEntry:
    """A cached leaf: the host pfn of the first page and the ACC_* rights."""

    level: int
    pfn: int
    access: int
    dirty: bool


# Model: a small TLB, like the hardware's, so the checks that walk every
# cached entry stay cheap; the oldest entry is evicted first.
TLB_LEAF_ENTRIES = 64
TLB_WALK_ENTRIES = 32


@attrs.define(eq=False)
class VcpuTlb:
    leaves: dict[tuple[str, int, int], TlbEntry] = attrs.field(factory=dict)
    # (context, level of the non-leaf SPTE, address >> its shift) -> child table pfn.
    walks: dict[tuple[str, int, int], int] = attrs.field(factory=dict)

    def flush_all(self) -> None:
        self.leaves.clear()
        self.walks.clear()

    def flush_context(self, ctx: str) -> None:
        for d in (self.leaves, self.walks):
            for k in [k for k in d if k[0] == ctx]:
                del d[k]

    def lookup(self, ctx: str, addr: int) -> TlbEntry | None:
        page = addr >> PAGE_SHIFT
        for level in (1, 2, 3):
            e = self.leaves.get((ctx, level, page >> KVM_HPAGE_GFN_SHIFT(level)))
            if e is not None:
                return e
        return None

    def fill(self, ctx: str, addr: int, entry: TlbEntry, path: list[tuple[int, int]]) -> None:
        page = addr >> PAGE_SHIFT
        key = (ctx, entry.level, page >> KVM_HPAGE_GFN_SHIFT(entry.level))
        self.leaves.pop(key, None)
        self.leaves[key] = entry
        if len(self.leaves) > TLB_LEAF_ENTRIES:
            del self.leaves[next(iter(self.leaves))]
        for level, child_pfn in path:
            wkey = (ctx, level, page >> KVM_HPAGE_GFN_SHIFT(level))
            self.walks.pop(wkey, None)
            self.walks[wkey] = child_pfn
            if len(self.walks) > TLB_WALK_ENTRIES:
                del self.walks[next(iter(self.walks))]

    def translate(self, ctx: str, addr: int) -> tuple[int, int, bool] | None:
        """(pfn of @addr's page, access, dirty) from the cached leaf, if any."""
        e = self.lookup(ctx, addr)
        if e is None:
            return None
        page = addr >> PAGE_SHIFT
        offset = page & ((1 << KVM_HPAGE_GFN_SHIFT(e.level)) - 1)
        return e.pfn + offset, e.access, e.dirty
