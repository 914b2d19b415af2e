"""struct kvm and struct kvm_vcpu for x86, mirroring include/linux/kvm_host.h,
arch/x86/include/asm/kvm_host.h, virt/kvm/kvm_main.c and parts of arch/x86/kvm/x86.c.

This module owns the state: configuration (module parameters and caps), the
memslots, the shadow MMU's page list and hash, the TDP MMU's roots, the
accounting and the per-VM and per-vCPU stats.  The MMU code lives in
shadow_mmu.py, paging_tmpl.py, tdp_mmu.py and mmu.py and takes a `Kvm`.

Model: one thread runs at a time.  mmu_lock, slots_lock, RCU and the memory
caches for faults are not modelled as locks; `mmu_unlock()` marks the points
where KVM drops mmu_lock, so checks can run exactly there.  Every remote TLB
flush is a full flush, as on hosts without a range-flush hypercall.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from kvmsplit.errors import HarnessError, kvm_bug_on
from kvmsplit.host import HostMm
from kvmsplit.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    KvmMemorySlot,
    kvm_dirty_bitmap_bytes,
)
from kvmsplit.spte import EPT_MASKS, NON_EPT_MASKS, PAGE_SHIFT, SpteMasks
from kvmsplit.tlb import VcpuTlb

if TYPE_CHECKING:
    from kvmsplit.mmu_page import KvmMmuPage

KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO = 50

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# Model: shadow and TDP page table pages get frame numbers from their own pool,
# far above guest memory, so a non-leaf SPTE's pfn never aliases guest memory.
# Both pools stay below the 46-bit host physical address space (spte.py).
SP_PFN_BASE = 1 << 32

MMU_CONFIGS = ("tdp", "tdp-legacy", "shadow")


@attrs.frozen(kw_only=True)
class KvmConfig:
    """Module parameters fixed at load time and the host's features.

    `tdp_enabled` is kvm_intel.ept / kvm_amd.npt; `ept` picks the SPTE layout
    (EPT when TDP runs on VMX, the non-EPT layout for shadow paging and NPT).
    """

    tdp_enabled: bool = True
    tdp_mmu: bool = True
    ept: bool = True
    pml: bool = False
    mmio_caching: bool = True

    @classmethod
    def named(cls, name: str, **overrides: bool) -> KvmConfig:
        """'tdp' (EPT, TDP MMU, nested guests on the shadow MMU), 'tdp-legacy'
        (EPT, tdp_mmu=N) or 'shadow' (ept=N: shadow paging)."""
        if name == "tdp":
            base = cls(tdp_enabled=True, tdp_mmu=True, ept=True)
        elif name == "tdp-legacy":
            base = cls(tdp_enabled=True, tdp_mmu=False, ept=True)
        elif name == "shadow":
            base = cls(tdp_enabled=False, tdp_mmu=True, ept=False)
        else:
            raise HarnessError(f"MMU configuration {name!r} is not one of {', '.join(MMU_CONFIGS)}")
        return attrs.evolve(base, **overrides)

    @property
    def tdp_mmu_enabled(self) -> bool:
        """tdp_mmu_enabled: the TDP MMU runs only when TDP is on."""
        return self.tdp_enabled and self.tdp_mmu

    @property
    def masks(self) -> SpteMasks:
        return EPT_MASKS if (self.tdp_enabled and self.ept) else NON_EPT_MASKS

    @property
    def cpu_dirty_log_size(self) -> int:
        """kvm_x86_ops.cpu_dirty_log_size: nonzero with PML."""
        return 512 if (self.pml and self.tdp_enabled and self.ept) else 0


@attrs.define
class KvmVmStat:
    """struct kvm_vm_stat (x86)."""

    remote_tlb_flush: int = 0
    remote_tlb_flush_requests: int = 0
    mmu_shadow_zapped: int = 0
    mmu_pte_write: int = 0
    mmu_pde_zapped: int = 0
    mmu_flooded: int = 0
    mmu_recycled: int = 0
    mmu_cache_miss: int = 0
    mmu_unsync: int = 0
    pages: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    nx_lpage_splits: int = 0
    max_mmu_rmap_size: int = 0
    max_mmu_page_hash_collisions: int = 0

    @property
    def pages_4k(self) -> int:
        return self.pages[0]

    @property
    def pages_2m(self) -> int:
        return self.pages[1]

    @property
    def pages_1g(self) -> int:
        return self.pages[2]

    def as_dict(self) -> dict[str, int]:
        d = attrs.asdict(self)
        pages = d.pop("pages")
        d["pages_4k"], d["pages_2m"], d["pages_1g"] = pages
        return d


@attrs.define
class KvmVcpuStat:
    pf_taken: int = 0
    pf_fixed: int = 0
    pf_emulate: int = 0
    pf_spurious: int = 0
    pf_fast: int = 0
    pf_mmio_spte_created: int = 0
    pf_guest: int = 0
    tlb_flush: int = 0
    insn_emulation: int = 0
    mmio_exits: int = 0


@attrs.define(eq=False)
class KvmMmuContext:
    """Model: the part of struct kvm_mmu the model needs (root_mmu or guest_mmu).

    `pgd` is the guest table root gfn for an indirect MMU (CR3 for shadow
    paging, EPTP for L2), None for a direct MMU.
    """

    name: str
    pgd: int | None = None
    root: KvmMmuPage | None = None


@attrs.define(eq=False)
class KvmVcpu:
    vcpu_id: int
    root_mmu: KvmMmuContext = attrs.field(factory=lambda: KvmMmuContext("root_mmu"))
    guest_mmu: KvmMmuContext = attrs.field(factory=lambda: KvmMmuContext("guest_mmu"))
    guest_mode: bool = False
    tlb: VcpuTlb = attrs.field(factory=VcpuTlb)
    stat: KvmVcpuStat = attrs.field(factory=KvmVcpuStat)
    # Model: the last page fault, for the emulation step that follows it.
    model_last_fault: Any = None

    @property
    def mmu(self) -> KvmMmuContext:
        return self.guest_mmu if self.guest_mode else self.root_mmu


@attrs.define(eq=False)
class Kvm:
    """struct kvm with struct kvm_arch (x86)."""

    config: KvmConfig = attrs.field(factory=KvmConfig)
    # Module parameters writable at run time (0644) and per-VM caps.
    eager_page_split: bool = True
    nx_huge_pages: bool = False
    disable_nx_huge_pages: bool = False
    manual_dirty_log_protect: int = 0

    memslots: dict[int, KvmMemorySlot] = attrs.field(factory=dict)
    memslots_generation: int = 0
    nr_memslot_pages: int = 0
    nr_memslots_dirty_logging: int = 0
    host: HostMm = attrs.field(factory=HostMm)
    # Model: guest memory contents, kept only for pages holding guest page tables.
    guest_tables: dict[int, list[int]] = attrs.field(factory=dict)

    # Shadow MMU (kvm->arch).  active_mmu_pages keeps insertion order, newest
    # last, so the oldest page is first (the kernel adds at the list head).
    active_mmu_pages: dict[KvmMmuPage, None] = attrs.field(factory=dict)
    mmu_page_hash: dict[int, list[KvmMmuPage]] = attrs.field(factory=dict)
    mmu_valid_gen: int = 0
    n_used_mmu_pages: int = 0
    n_max_mmu_pages: int = 0
    n_requested_mmu_pages: int = 0
    indirect_shadow_pages: int = 0
    shadow_root_allocated: bool = False
    possible_nx_huge_pages: dict[KvmMmuPage, None] = attrs.field(factory=dict)

    # TDP MMU.
    tdp_mmu_roots: list[KvmMmuPage] = attrs.field(factory=list)
    tdp_mmu_pages: int = 0

    # Model: page table pages by frame number (the kernel's pfn_to_page()->private).
    sp_by_pfn: dict[int, KvmMmuPage] = attrs.field(factory=dict)
    next_sp_pfn: int = SP_PFN_BASE
    next_sp_seq: int = 0

    vcpus: list[KvmVcpu] = attrs.field(factory=list)
    stat: KvmVmStat = attrs.field(factory=KvmVmStat)
    # Model: why a flush is owed.  KVM must pay `tlb_flush_debt` before
    # dropping mmu_lock, and the dirty-logging debts (W or D cleared for
    # dirty logging) before returning to userspace.
    tlb_flush_debt: list[str] = attrs.field(factory=list)
    tlb_flush_debt_deferred: list[str] = attrs.field(factory=list)
    tlb_flush_debt_count: int = 0
    tlb_flush_debt_deferred_count: int = 0
    model_unflushed_huge_drops: int = 0
    # Model: callbacks run at every point where KVM drops mmu_lock.
    unlock_hooks: list[Callable[[Kvm, str], None]] = attrs.field(factory=list)
    # Model: callbacks run at every remote TLB flush (for traces and checks).
    flush_hooks: list[Callable[[Kvm, str], None]] = attrs.field(factory=list)
    # Model: eager splitting's policy (models/), its caches and nondeterminism,
    # and another thread at the TDP MMU's compare-and-exchange.
    model_split_policy: Any = None
    model_split_caches: Any = attrs.field(factory=lambda: _split().SplitCaches())
    model_split_env: Any = attrs.field(factory=lambda: _split().SplitEnv())
    model_tdp_race: Callable[[Kvm, Any], None] | None = None

    @classmethod
    def create(cls, config: KvmConfig | str = "tdp", nr_vcpus: int = 1, **params: object) -> Kvm:
        """KVM_CREATE_VM and KVM_CREATE_VCPU @nr_vcpus times."""
        if isinstance(config, str):
            config = KvmConfig.named(config)
        if not isinstance(nr_vcpus, int) or not 1 <= nr_vcpus <= 64:
            raise HarnessError(f"Kvm.create: nr_vcpus={nr_vcpus!r} is not between 1 and 64")
        kvm = cls(config=config, **params)  # type: ignore[arg-type]
        for i in range(nr_vcpus):
            kvm.vcpus.append(KvmVcpu(vcpu_id=i))
        return kvm

    # --- helpers shared by the MMU modules -----------------------------------

    @property
    def masks(self) -> SpteMasks:
        return self.config.masks

    @property
    def tdp_mmu_enabled(self) -> bool:
        return self.config.tdp_mmu_enabled

    def is_nx_huge_page_enabled(self) -> bool:
        """mmu_internal.h is_nx_huge_page_enabled()."""
        return self.nx_huge_pages and not self.disable_nx_huge_pages

    def kvm_memslots_have_rmaps(self) -> bool:
        return not self.tdp_mmu_enabled or self.shadow_root_allocated

    def kvm_dirty_log_manual_protect_and_init_set(self) -> bool:
        return bool(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def vcpu(self, vcpu_id: int) -> KvmVcpu:
        if not isinstance(vcpu_id, int) or not 0 <= vcpu_id < len(self.vcpus):
            raise HarnessError(f"vcpu {vcpu_id!r} does not exist (the VM has {len(self.vcpus)})")
        return self.vcpus[vcpu_id]

    def slot(self, slot_id: int) -> KvmMemorySlot:
        s = self.memslots.get(slot_id)
        if s is None:
            raise HarnessError(f"memslot {slot_id!r} does not exist (have {sorted(self.memslots)})")
        return s

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        for s in self.memslots.values():
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None

    def alloc_page_table_pfn(self) -> int:
        pfn = self.next_sp_pfn
        self.next_sp_pfn += 1
        return pfn

    def spte_to_child_sp(self, spte: int) -> KvmMmuPage:
        from kvmsplit.spte import spte_to_pfn

        sp = self.sp_by_pfn.get(spte_to_pfn(spte))
        kvm_bug_on(sp is None, "spte_to_child_sp", lambda: f"non-leaf SPTE {spte:#x} points at no page table")
        assert sp is not None
        return sp

    def kvm_update_page_stats(self, level: int, count: int) -> None:
        """mmu.h kvm_update_page_stats()."""
        self.stat.pages[level - 1] += count

    # --- accounting (mmu.c) ---------------------------------------------------

    def kvm_mmu_available_pages(self) -> int:
        if self.n_max_mmu_pages > self.n_used_mmu_pages:
            return self.n_max_mmu_pages - self.n_used_mmu_pages
        return 0

    # --- TLB flushes (kvm_main.c) ---------------------------------------------

    def kvm_flush_remote_tlbs(self, reason: str = "") -> None:
        """Every vCPU drops every cached translation before this returns."""
        self.stat.remote_tlb_flush_requests += 1
        self.stat.remote_tlb_flush += 1
        for v in self.vcpus:
            v.tlb.flush_all()
        self.tlb_flush_debt.clear()
        self.tlb_flush_debt_deferred.clear()
        self.tlb_flush_debt_count = self.tlb_flush_debt_deferred_count = 0
        for hook in self.flush_hooks:
            hook(self, reason)

    def kvm_flush_remote_tlbs_range(self, gfn: int, nr_pages: int, reason: str = "") -> None:
        # Model: no range-flush hypercall, so KVM falls back to a full flush.
        self.kvm_flush_remote_tlbs(reason or f"range {gfn:#x}+{nr_pages:#x}")

    def kvm_flush_remote_tlbs_memslot(self, slot: KvmMemorySlot, reason: str = "") -> None:
        self.kvm_flush_remote_tlbs_range(slot.base_gfn, slot.npages, reason or f"memslot {slot.id}")

    def owe_flush(self, reason: str, deferred: bool = False) -> None:
        """Model: record that a TLB flush is required before mmu_lock is
        dropped, or (@deferred, dirty logging) before returning to userspace.

        Only the first few reasons are kept; the count is exact.  Callers pass
        a short fixed string, so a pass over a gigabyte of SPTEs stays cheap.
        """
        debt = self.tlb_flush_debt_deferred if deferred else self.tlb_flush_debt
        if len(debt) < 8:
            debt.append(reason)
        if deferred:
            self.tlb_flush_debt_deferred_count += 1
        else:
            self.tlb_flush_debt_count += 1

    def mmu_unlock(self, where: str) -> None:
        """Model: KVM drops mmu_lock at @where; run the release-point checks."""
        for hook in self.unlock_hooks:
            hook(self, where)


def _split():  # type: ignore[no-untyped-def]
    from kvmsplit import split

    return split


def kvm_vcpu_flush_tlb_guest(vcpu: KvmVcpu) -> None:
    vcpu.stat.tlb_flush += 1
    vcpu.tlb.flush_all()


def page_table_pfn_range_ok(pfn: int) -> bool:
    return pfn >= SP_PFN_BASE


def validate_memory_region(
    kvm: Kvm, slot_id: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
) -> None:
    """The checks of __kvm_set_memory_region() that the model can fail, as HarnessError."""
    where = f"KVM_SET_USER_MEMORY_REGION(slot={slot_id})"
    if not isinstance(slot_id, int) or not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise HarnessError(f"{where}: slot id {slot_id!r} is out of range (-EINVAL)")
    if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
        raise HarnessError(f"{where}: flags {flags:#x} has unknown bits (-EINVAL)")
    for name, v in (
        ("guest_phys_addr", guest_phys_addr),
        ("memory_size", memory_size),
        ("userspace_addr", userspace_addr),
    ):
        if not isinstance(v, int) or v < 0:
            raise HarnessError(f"{where}: {name}={v!r} is not a non-negative int (-EINVAL)")
        if v & ((1 << PAGE_SHIFT) - 1):
            raise HarnessError(f"{where}: {name}={v:#x} is not page aligned (-EINVAL)")
    if guest_phys_addr + memory_size > (1 << 52):
        raise HarnessError(f"{where}: gpa {guest_phys_addr:#x}+{memory_size:#x} exceeds the 52-bit gpa space (-EINVAL)")


def dirty_bitmap_alloc(slot: KvmMemorySlot, initially_set: bool) -> None:
    """kvm_alloc_dirty_bitmap(), all ones in initially-set mode (kvm_prepare_memory_region())."""
    n = kvm_dirty_bitmap_bytes(slot)
    if initially_set:
        bm = bytearray(b"\xff" * n)
        # Bits past npages stay clear.
        extra = n * 8 - slot.npages
        for i in range(extra):
            bit = slot.npages + i
            bm[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        slot.dirty_bitmap = bm
    else:
        slot.dirty_bitmap = bytearray(n)
