"""v3: the seed patch, "[PATCH v3 22/23] KVM: x86/mmu: Support Eager Page Splitting in the shadow MMU".

David Matlack, April 2022 (Message-Id 20220401175554.1931568-23-dmatlack@google.com),
as reviewed by Sean Christopherson.  Its differences from the merged code
(kernel-brief section 14):

- it splits with any MMU that has rmaps, also without the TDP MMU (tdp_mmu=N,
  ept=N), and with no guest_mode check;
- skip_split_huge_page() skips unsync and invalid owners silently, as a
  policy, where the merged code WARNs on an unsync owner;
- kvm_mmu_get_sp_for_split() finds an existing child with its own lookup,
  __kvm_mmu_find_shadow_page(), which neither syncs nor zaps unsync pages of
  another role at the gfn (the merged code goes through
  __kvm_mmu_get_shadow_page() and does both);
- the split caches are topped up at the start of each slot split and freed
  after it (the merged caches live until the VM is destroyed).

Model: whether v3's lookup counts a miss in mmu_cache_miss is not recorded
in the brief; this model counts it, as kvm_mmu_find_shadow_page() does.
"""

from __future__ import annotations

from kvmsplit import shadow_mmu
from kvmsplit.errors import kvm_bug_on
from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KvmMemorySlot
from kvmsplit.mmu_page import (
    KVM_MMU_HASH_SHIFT,
    KvmMmuPage,
    hash_64,
    kvm_mmu_child_role,
    kvm_mmu_page_get_access,
    kvm_mmu_page_get_gfn,
)
from kvmsplit.rmap import Sptep
from kvmsplit.split import MergedSplit, split_caches, split_env
from kvmsplit.spte import is_large_pte


class V3Split(MergedSplit):
    name = "v3"

    def kvm_mmu_slot_try_split_huge_pages(self, kvm: Kvm, slot: KvmMemorySlot, target_level: int) -> None:
        start, end = slot.base_gfn, slot.end_gfn
        if kvm.kvm_memslots_have_rmaps():
            self.kvm_shadow_mmu_try_split_huge_pages(kvm, slot, start, end, target_level)
            kvm.mmu_unlock("kvm_mmu_slot_try_split_huge_pages rmap")
        if kvm.tdp_mmu_enabled:
            self.kvm_tdp_mmu_try_split_huge_pages(kvm, slot, start, end, target_level, True)
            kvm.mmu_unlock("kvm_mmu_slot_try_split_huge_pages tdp")
        self.free_split_caches(kvm)

    def kvm_mmu_try_split_huge_pages(
        self, kvm: Kvm, slot: KvmMemorySlot, start: int, end: int, target_level: int
    ) -> None:
        if kvm.kvm_memslots_have_rmaps():
            self.kvm_shadow_mmu_try_split_huge_pages(kvm, slot, start, end, target_level)
        if kvm.tdp_mmu_enabled:
            self.kvm_tdp_mmu_try_split_huge_pages(kvm, slot, start, end, target_level, False)
        self.free_split_caches(kvm)

    def free_split_caches(self, kvm: Kvm) -> None:
        caches = split_caches(kvm)
        for cache in (caches.desc, caches.page_header, caches.shadow_page):
            cache.nobjs = 0

    def skip_split(self, kvm: Kvm, huge_sptep: Sptep) -> bool:
        """skip_split_huge_page(): skip invalid and, as a policy, unsync owners."""
        sp = huge_sptep.sp
        kvm_bug_on(not is_large_pte(huge_sptep.spte), "skip_split_huge_page", f"{huge_sptep!r} not large")
        if sp.unsync:
            split_env(kvm).events["v3_skip_unsync"] += 1
        return bool(sp.role.invalid or sp.unsync)

    def shadow_mmu_get_sp_for_split(self, kvm: Kvm, huge_sptep: Sptep) -> KvmMmuPage:
        """kvm_mmu_get_sp_for_split(): reuse through __kvm_mmu_find_shadow_page(), else a new page."""
        huge_sp = huge_sptep.sp
        index = huge_sptep.index
        gfn = kvm_mmu_page_get_gfn(huge_sp, index)
        role = kvm_mmu_child_role(huge_sp, index, True, kvm_mmu_page_get_access(huge_sp, index))
        for sp in kvm.mmu_page_hash.get(hash_64(gfn, KVM_MMU_HASH_SHIFT), []):
            if shadow_mmu.is_obsolete_sp(kvm, sp) or sp.gfn != gfn or sp.role.word != role.word:
                continue
            kvm_bug_on(sp.unsync, "kvm_mmu_get_sp_for_split", f"reusing unsync {sp!r}")
            split_env(kvm).events["reuse"] += 1
            return sp
        kvm.stat.mmu_cache_miss += 1
        caches = split_caches(kvm)
        return shadow_mmu.kvm_mmu_alloc_shadow_page(kvm, gfn, role, (caches.page_header, caches.shadow_page))


MODEL = V3Split()
