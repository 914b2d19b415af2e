"""VM and vCPU ioctls and host events, mirroring arch/x86/kvm/x86.c and virt/kvm/kvm_main.c.

These are the entry points a state machine or a trace drives:
KVM_SET_USER_MEMORY_REGION (create, delete, move, flag changes),
KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_ENABLE_CAP for manual dirty-log
protection, KVM_SET_NR_MMU_PAGES, the module parameters writable at run
time, guest CR3 loads and nested VM-entry/exit, guest TLB flushes, and host
mm changes that reach KVM through the MMU notifier.

Errors the kernel returns to userspace are raised as HarnessError naming the
value and the errno; they never change state.
"""

from __future__ import annotations

from kvmsplit import mmu, paging_tmpl, shadow_mmu, split
from kvmsplit.errors import HarnessError
from kvmsplit.kvm import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO,
    KVM_MIN_ALLOC_MMU_PAGES,
    Kvm,
    dirty_bitmap_alloc,
    kvm_vcpu_flush_tlb_guest,
    validate_memory_region,
)
from kvmsplit.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    KvmMemorySlot,
    kvm_dirty_bitmap_bytes,
)
from kvmsplit.spte import PAGE_SHIFT, PG_LEVEL_2M, PG_LEVEL_4K

KVM_MR_CREATE, KVM_MR_DELETE, KVM_MR_MOVE, KVM_MR_FLAGS_ONLY = "create", "delete", "move", "flags_only"


# --- memslots -------------------------------------------------------------------


def kvm_set_user_memory_region(
    kvm: Kvm,
    slot_id: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    backing: str | None = None,
) -> str | None:
    """KVM_SET_USER_MEMORY_REGION; @backing creates the host VMA first ('4k', 'thp', 'hugetlb-1g').

    Returns the change kind, or None for a no-op.
    """
    validate_memory_region(kvm, slot_id, flags, guest_phys_addr, memory_size, userspace_addr)
    where = f"KVM_SET_USER_MEMORY_REGION(slot={slot_id})"
    old = kvm.memslots.get(slot_id)
    npages = memory_size >> PAGE_SHIFT
    base_gfn = guest_phys_addr >> PAGE_SHIFT
    if npages == 0:
        if old is None:
            raise HarnessError(f"{where}: deleting a slot that does not exist (-EINVAL)")
        change = KVM_MR_DELETE
    elif old is None:
        change = KVM_MR_CREATE
    else:
        if userspace_addr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
            raise HarnessError(f"{where}: only the base gfn or the dirty-log flag of a slot may change (-EINVAL)")
        if base_gfn != old.base_gfn:
            change = KVM_MR_MOVE
        elif flags != old.flags:
            change = KVM_MR_FLAGS_ONLY
        else:
            return None
    if change in (KVM_MR_CREATE, KVM_MR_MOVE):
        for other in kvm.memslots.values():
            if other.id != slot_id and base_gfn < other.end_gfn and other.base_gfn < base_gfn + npages:
                raise HarnessError(f"{where}: gfn {base_gfn:#x}+{npages:#x} overlaps slot {other.id} (-EEXIST)")
    if change == KVM_MR_CREATE:
        hva_end = userspace_addr + memory_size
        vma = kvm.host.find_vma(userspace_addr)
        if vma is None:
            if backing is None:
                raise HarnessError(f"{where}: hva {userspace_addr:#x} is not mapped on the host (pass a backing)")
            kvm.host.add_vma(userspace_addr, memory_size, backing)
        elif hva_end > vma.end:
            raise HarnessError(f"{where}: hva range {userspace_addr:#x}+{memory_size:#x} runs past its host VMA")

    if change in (KVM_MR_DELETE, KVM_MR_MOVE):
        assert old is not None
        # kvm_invalidate_memslot(): the slot stays visible, flagged invalid, while
        # kvm_arch_flush_shadow_memslot() zaps the whole VM (rmap_remove() still
        # finds it); only then does it go.
        old.flags |= KVM_MEMSLOT_INVALID
        kvm.memslots_generation += 1
        shadow_mmu.kvm_mmu_zap_all_fast(kvm)
        old.flags &= ~KVM_MEMSLOT_INVALID
        del kvm.memslots[slot_id]

    new: KvmMemorySlot | None = None
    if change in (KVM_MR_CREATE, KVM_MR_MOVE):
        new = KvmMemorySlot(id=slot_id, base_gfn=base_gfn, npages=npages, userspace_addr=userspace_addr, flags=flags)
    elif change == KVM_MR_FLAGS_ONLY:
        assert old is not None
        new = old
    # kvm_prepare_memory_region(): the dirty bitmap.
    if new is not None:
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            new.dirty_bitmap = None
            new.model_written.clear()
        elif old is not None and old.dirty_bitmap is not None:
            # Any change but a delete keeps the old bitmap (kvm_prepare_memory_region()).
            new.dirty_bitmap = old.dirty_bitmap
            new.model_written = {g - old.base_gfn + new.base_gfn for g in old.model_written}
        else:
            dirty_bitmap_alloc(new, kvm.kvm_dirty_log_manual_protect_and_init_set())
    old_flags = old.flags if old is not None else 0
    if new is not None:
        new.flags = flags
        kvm.memslots[slot_id] = new
    kvm.memslots_generation += 1
    # kvm_commit_memory_region()
    if change == KVM_MR_DELETE:
        assert old is not None
        kvm.nr_memslot_pages -= old.npages
    elif change == KVM_MR_CREATE:
        kvm.nr_memslot_pages += npages
    new_flags = 0 if change == KVM_MR_DELETE else flags
    if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
        kvm.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
    kvm_arch_commit_memory_region(kvm, old_flags, new, change)
    return change


def kvm_arch_commit_memory_region(kvm: Kvm, old_flags: int, new: KvmMemorySlot | None, change: str) -> None:
    if not kvm.n_requested_mmu_pages and change in (KVM_MR_CREATE, KVM_MR_DELETE):
        nr_mmu_pages = max(kvm.nr_memslot_pages // KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO, KVM_MIN_ALLOC_MMU_PAGES)
        shadow_mmu.kvm_mmu_change_mmu_pages(kvm, nr_mmu_pages)
        kvm.mmu_unlock("kvm_mmu_change_mmu_pages")
    if new is not None:
        kvm_mmu_slot_apply_flags(kvm, old_flags, new, change)


def kvm_mmu_slot_apply_flags(kvm: Kvm, old_flags: int, new: KvmMemorySlot, change: str) -> None:
    """Start or stop dirty logging on a slot (x86.c)."""
    log_dirty_pages = bool(new.flags & KVM_MEM_LOG_DIRTY_PAGES)
    if change != KVM_MR_FLAGS_ONLY or new.flags & KVM_MEM_READONLY:
        return
    if not (old_flags ^ new.flags) & KVM_MEM_LOG_DIRTY_PAGES:
        return
    if not log_dirty_pages:
        # Dirty logging stopped: zap small SPTEs so faults map huge again.
        mmu.kvm_mmu_zap_collapsible_sptes(kvm, new)
        return
    # Initially-set: every page is already reported dirty, nothing to protect.
    if kvm.kvm_dirty_log_manual_protect_and_init_set():
        return
    if kvm.eager_page_split:
        split.kvm_mmu_slot_try_split_huge_pages(kvm, new, PG_LEVEL_4K)
    if kvm.config.cpu_dirty_log_size:
        mmu.kvm_mmu_slot_leaf_clear_dirty(kvm, new)
        mmu.kvm_mmu_slot_remove_write_access(kvm, new, PG_LEVEL_2M)
    else:
        mmu.kvm_mmu_slot_remove_write_access(kvm, new, PG_LEVEL_4K)
    # Only the slot must be write-protected before returning to userspace,
    # so the flush comes after mmu_lock is dropped.
    kvm.kvm_flush_remote_tlbs_memslot(new, "kvm_mmu_slot_apply_flags")


# --- dirty log ioctls -------------------------------------------------------------


def kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm: Kvm, flags: int) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
    if not isinstance(flags, int) or flags & ~allowed:
        raise HarnessError(f"KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): flags {flags!r} has unknown bits (-EINVAL)")
    if flags == KVM_DIRTY_LOG_INITIALLY_SET:
        raise HarnessError("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): INITIALLY_SET needs ENABLE (-EINVAL)")
    kvm.manual_dirty_log_protect = flags


def _dirty_log_slot(kvm: Kvm, slot_id: int, where: str) -> KvmMemorySlot:
    slot = kvm.memslots.get(slot_id)
    if slot is None or slot.dirty_bitmap is None:
        raise HarnessError(f"{where}: slot {slot_id!r} does not exist or is not dirty-logged (-ENOENT)")
    return slot


def _model_harvested(slot: KvmMemorySlot, gfn_offset: int, mask: int) -> None:
    """Model: userspace has seen these writes; forget them."""
    while mask:
        low = mask & -mask
        slot.model_written.discard(slot.base_gfn + gfn_offset + low.bit_length() - 1)
        mask ^= low


def kvm_get_dirty_log(kvm: Kvm, slot_id: int) -> bytes:
    """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect()): the bitmap, re-protecting what it reports."""
    slot = _dirty_log_slot(kvm, slot_id, "KVM_GET_DIRTY_LOG")
    bitmap = slot.dirty_bitmap
    assert bitmap is not None
    if kvm.manual_dirty_log_protect:
        return bytes(bitmap)
    n = kvm_dirty_bitmap_bytes(slot)
    buffer = bytearray(n)
    flush = False
    for i in range(0, n, 8):
        mask = int.from_bytes(bitmap[i : i + 8], "little")
        if not mask:
            continue
        flush = True
        bitmap[i : i + 8] = bytes(8)
        buffer[i : i + 8] = mask.to_bytes(8, "little")
        _model_harvested(slot, i * 8, mask)
        mmu.kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, i * 8, mask)
    kvm.mmu_unlock("kvm_get_dirty_log_protect")
    if flush:
        kvm.kvm_flush_remote_tlbs_memslot(slot, "kvm_get_dirty_log_protect")
    return bytes(buffer)


def kvm_clear_dirty_log(kvm: Kvm, slot_id: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
    """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect())."""
    where = "KVM_CLEAR_DIRTY_LOG"
    if not kvm.manual_dirty_log_protect:
        raise HarnessError(f"{where}: manual dirty-log protection is not enabled (-EINVAL)")
    if not isinstance(first_page, int) or first_page < 0 or first_page & 63:
        raise HarnessError(f"{where}: first_page {first_page!r} is not a multiple of 64 (-EINVAL)")
    slot = _dirty_log_slot(kvm, slot_id, where)
    if not isinstance(num_pages, int) or num_pages < 0:
        raise HarnessError(f"{where}: num_pages {num_pages!r} is negative (-EINVAL)")
    if (
        first_page > slot.npages
        or num_pages > slot.npages - first_page
        or (num_pages < slot.npages - first_page and num_pages & 63)
    ):
        raise HarnessError(
            f"{where}: pages {first_page:#x}+{num_pages:#x} do not fit slot {slot_id} of {slot.npages:#x} pages (-EINVAL)"
        )
    need = ((num_pages + 63) // 64) * 8
    if len(bitmap) < need:
        raise HarnessError(f"{where}: bitmap has {len(bitmap)} bytes, {need} needed (-EFAULT)")
    dirty = slot.dirty_bitmap
    assert dirty is not None
    flush = False
    for w in range((num_pages + 63) // 64):
        mask = int.from_bytes(bitmap[w * 8 : w * 8 + 8], "little")
        if not mask:
            continue
        i = first_page // 64 + w
        cur = int.from_bytes(dirty[i * 8 : i * 8 + 8], "little")
        # atomic_long_fetch_andnot(): only bits that really were set count.
        mask &= cur
        dirty[i * 8 : i * 8 + 8] = (cur & ~mask).to_bytes(8, "little")
        _model_harvested(slot, i * 64, mask)
        if mask:
            flush = True
            mmu.kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, i * 64, mask)
    kvm.mmu_unlock("kvm_clear_dirty_log_protect")
    if flush:
        kvm.kvm_flush_remote_tlbs_memslot(slot, "kvm_clear_dirty_log_protect")


# --- MMU pages, parameters ------------------------------------------------------------


def kvm_vm_ioctl_set_nr_mmu_pages(kvm: Kvm, nr_mmu_pages: int) -> None:
    if not isinstance(nr_mmu_pages, int) or nr_mmu_pages < KVM_MIN_ALLOC_MMU_PAGES:
        raise HarnessError(
            f"KVM_SET_NR_MMU_PAGES: {nr_mmu_pages!r} is below KVM_MIN_ALLOC_MMU_PAGES={KVM_MIN_ALLOC_MMU_PAGES} (-EINVAL)"
        )
    kvm.n_requested_mmu_pages = nr_mmu_pages
    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, nr_mmu_pages)
    kvm.mmu_unlock("kvm_mmu_change_mmu_pages")


def set_eager_page_split(kvm: Kvm, value: bool) -> None:
    """Write /sys/module/kvm/parameters/eager_page_split (0644, read at every use)."""
    kvm.eager_page_split = bool(value)


def set_nx_huge_pages(kvm: Kvm, value: bool) -> None:
    """set_nx_huge_pages(): a change zaps every VM's MMU so new mappings follow it."""
    value = bool(value)
    if value == kvm.nx_huge_pages:
        return
    kvm.nx_huge_pages = value
    shadow_mmu.kvm_mmu_zap_all_fast(kvm)


# --- vCPU context ----------------------------------------------------------------------


def kvm_set_cr3(kvm: Kvm, vcpu_id: int, root_gfn: int) -> None:
    """A guest CR3 load under shadow paging; the same value is a TLB flush (kvm_invalidate_pcid())."""
    vcpu = kvm.vcpu(vcpu_id)
    if kvm.config.tdp_enabled:
        raise HarnessError("kvm_set_cr3: with TDP, guest CR3 loads do not reach KVM's MMU")
    shadow_mmu.check_gfn(kvm, root_gfn, "kvm_set_cr3")
    ctx = vcpu.root_mmu
    if ctx.pgd == root_gfn and ctx.root is not None:
        # KVM_REQ_MMU_SYNC + KVM_REQ_TLB_FLUSH_CURRENT
        paging_tmpl.kvm_mmu_sync_roots(kvm, vcpu)
        kvm_vcpu_flush_tlb_guest(vcpu)
        return
    # Model: no prev_roots cache; the old root is released (kvm_mmu_new_pgd()).
    shadow_mmu.kvm_mmu_free_roots(kvm, ctx)
    ctx.pgd = root_gfn
    kvm_vcpu_flush_tlb_guest(vcpu)


def nested_vmx_enter(kvm: Kvm, vcpu_id: int, eptp_gfn: int) -> None:
    """VMLAUNCH/VMRESUME of L2 with L1's EPT at @eptp_gfn (nested EPT)."""
    vcpu = kvm.vcpu(vcpu_id)
    if not (kvm.config.tdp_enabled and kvm.config.ept):
        raise HarnessError("nested_vmx_enter: nested EPT needs ept=Y (the model has no shadow-on-shadow)")
    shadow_mmu.check_gfn(kvm, eptp_gfn, "nested_vmx_enter")
    ctx = vcpu.guest_mmu
    if ctx.pgd != eptp_gfn:
        shadow_mmu.kvm_mmu_free_roots(kvm, ctx)
        ctx.pgd = eptp_gfn
    vcpu.guest_mode = True


def nested_vmx_vmexit(kvm: Kvm, vcpu_id: int) -> None:
    vcpu = kvm.vcpu(vcpu_id)
    if not vcpu.guest_mode:
        raise HarnessError(f"nested_vmx_vmexit: vcpu {vcpu_id} is not in guest mode")
    vcpu.guest_mode = False


def kvm_guest_tlb_flush(kvm: Kvm, vcpu_id: int) -> None:
    """The guest flushes its TLB: a CR3 reload (shadow paging) or INVEPT (L2).

    INVEPT frees the guest_mmu root (handle_invept() -> kvm_mmu_free_roots());
    the next L2 entry reloads and resyncs it.
    """
    vcpu = kvm.vcpu(vcpu_id)
    if vcpu.guest_mode:
        shadow_mmu.kvm_mmu_free_roots(kvm, vcpu.guest_mmu)
        vcpu.tlb.flush_context("guest_mmu")
        return
    if not kvm.config.tdp_enabled and vcpu.root_mmu.pgd is not None:
        kvm_set_cr3(kvm, vcpu_id, vcpu.root_mmu.pgd)
        return
    kvm_vcpu_flush_tlb_guest(vcpu)


# --- host events (the MMU notifier) ---------------------------------------------------


def host_thp_split(kvm: Kvm, hva: int) -> bool:
    """The host splits the huge page at @hva (e.g. a partial mprotect)."""
    rng = kvm.host.split_huge(hva)
    if rng is None:
        return False
    mmu.kvm_mmu_notifier_invalidate_range(kvm, *rng)
    return True


def host_thp_collapse(kvm: Kvm, hva: int) -> bool:
    """khugepaged or MADV_COLLAPSE replaces 4K pages with a new huge page."""
    size = 1 << 21
    frame = hva & ~(size - 1)
    vma = kvm.host.find_vma(hva)
    if vma is None or vma.max_level < PG_LEVEL_2M or frame < vma.start or frame + size > vma.end:
        return False
    mmu.kvm_mmu_notifier_invalidate_range(kvm, frame, frame + size)
    return kvm.host.collapse(hva) is not None


def host_madv_dontneed(kvm: Kvm, hva: int, size: int) -> None:
    """MADV_DONTNEED: the host frees the range; KVM unmaps it first."""
    if size <= 0 or hva & 4095 or size & 4095:
        raise HarnessError(f"host_madv_dontneed: hva {hva:#x} size {size:#x} is not page aligned")
    mmu.kvm_mmu_notifier_invalidate_range(kvm, hva, hva + size)
    # zap_pmd_range() splits a THP the range covers only in part, and
    # __split_huge_pmd() invalidates the whole huge page: KVM zaps the SPTEs
    # of the pages that stay too (seen on real KVM, tests/realkvm).
    huge = 1 << 21
    for edge in sorted({hva, hva + size - 1}):
        frame = edge & ~(huge - 1)
        found = kvm.host._lookup(edge)
        vma = kvm.host.find_vma(edge)
        covered = hva <= frame and frame + huge <= hva + size
        if found is not None and found[0] == PG_LEVEL_2M and vma is not None and vma.policy == "thp" and not covered:
            mmu.kvm_mmu_notifier_invalidate_range(kvm, frame, frame + huge)
    kvm.host.free(hva, hva + size)
