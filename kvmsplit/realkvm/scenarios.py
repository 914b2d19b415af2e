"""Conformance scenarios, each written once and run on real KVM and on the model.

A scenario is a guest page-table layout plus a list of steps.  Each step
knows how to act on both sides (conform.RealSide, conform.ModelSide): a
memslot change, a guest pass driven through the mailbox, a dirty-log
ioctl, a host mm change that reaches KVM's MMU notifier.  `Check` steps and
the dirty-log steps produce observations; conform.py compares them.

Test memory lives at TEST_GPA and above, away from the system slot (gpa 0,
2 MiB: GDT, page tables, mailbox, loop) and below MMIO_GPA.  Host memory
is written in full by the host before its slot is created, so every page
is populated (a THP where the VMA allows) before the guest touches it; the
model's host is populated the same way, because prefetching
(direct_pte_prefetch(), FNAME(pte_prefetch)) maps only host pages that are
already present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from kvmsplit.realkvm.guest import MAILBOX_OP_READ, MAILBOX_OP_STORE, MAILBOX_OP_WRITE, PD_GPA, GuestLayout

if TYPE_CHECKING:
    from kvmsplit.realkvm.conform import Side

MiB = 1 << 20
HPAGE = 2 * MiB
PAGE = 4096
TEST_GPA = 64 * MiB
KVM_MEM_LOG_DIRTY_PAGES = 1


# --- steps --------------------------------------------------------------------------


@attrs.frozen
class Slot:
    """Create memslot @slot over fresh host memory ('thp' or '4k'), @misalign bytes past 2 MiB."""

    slot: int
    gpa: int
    size: int
    backing: str = "thp"
    misalign: int = 0
    flags: int = 0

    def apply(self, side: Side) -> None:
        side.create_slot(self)


@attrs.frozen
class SetFlags:
    """KVM_SET_USER_MEMORY_REGION on an existing slot with new flags (dirty logging on or off)."""

    slot: int
    flags: int

    def apply(self, side: Side) -> None:
        side.set_flags(self.slot, self.flags)


@attrs.frozen
class MoveSlot:
    """KVM_SET_USER_MEMORY_REGION of an existing slot at a new gpa (KVM_MR_MOVE)."""

    slot: int
    gpa: int

    def apply(self, side: Side) -> None:
        side.move_slot(self.slot, self.gpa)


@attrs.frozen
class DeleteSlot:
    slot: int

    def apply(self, side: Side) -> None:
        side.delete_slot(self.slot)


@attrs.frozen
class ManualProtect:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with @flags (1 or 3)."""

    flags: int

    def apply(self, side: Side) -> None:
        side.enable_manual_protect(self.flags)


@attrs.frozen
class Run:
    """One guest pass: read or write [lo, hi) every @stride bytes, then the MMIO exit."""

    lo: int
    hi: int
    stride: int = PAGE
    op: str = "write"
    vcpu: int = 0

    @property
    def mailbox_op(self) -> int:
        return {"write": MAILBOX_OP_WRITE, "read": MAILBOX_OP_READ, "store": MAILBOX_OP_STORE}[self.op]

    def apply(self, side: Side) -> None:
        side.run(self)


@attrs.frozen
class StorePte:
    """The guest stores into entry @index of its own page table at @table_gpa: with @width 1 the
    write pass stores byte 1 into the entry's low byte, with @width 8 op 2 stores the whole
    entry.  Either way the entry keeps its frame but loses RW, U, A, D (and PS)."""

    table_gpa: int
    index: int
    width: int = 8
    vcpu: int = 0

    @property
    def run(self) -> Run:
        lo = self.table_gpa + 8 * self.index
        return Run(lo, lo + 1, PAGE, "write" if self.width == 1 else "store", self.vcpu)

    def new_gpte(self, old: int) -> int:
        return (old & ~0xFF) | 0x01

    def apply(self, side: Side) -> None:
        side.store_pte(self)


@attrs.frozen
class GetDirtyLog:
    slot: int
    label: str

    def apply(self, side: Side) -> None:
        side.get_dirty_log(self.slot, self.label)


@attrs.frozen
class ClearDirtyLog:
    """KVM_CLEAR_DIRTY_LOG of @num_pages from @first_page; @gfn_offsets None clears all of them."""

    slot: int
    first_page: int
    num_pages: int
    gfn_offsets: tuple[int, ...] | None = None

    def apply(self, side: Side) -> None:
        side.clear_dirty_log(self)


@attrs.frozen
class DontNeed:
    """madvise(MADV_DONTNEED) on part of a slot's host memory."""

    slot: int
    offset: int
    size: int

    def apply(self, side: Side) -> None:
        side.madv_dontneed(self.slot, self.offset, self.size)


@attrs.frozen
class Collapse:
    """madvise(MADV_COLLAPSE) on the 2 MiB frame at @offset of a slot's host memory."""

    slot: int
    offset: int

    def apply(self, side: Side) -> None:
        side.madv_collapse(self.slot, self.offset)


@attrs.frozen
class SplitThp:
    """The host splits the THP under @offset: mprotect() of one page to read-only and straight
    back, which splits the huge PMD (the VMA re-merges; the page table stays split)."""

    slot: int
    offset: int

    def apply(self, side: Side) -> None:
        side.split_thp(self.slot, self.offset)


@attrs.frozen
class Check:
    """Observe the VM stats and each vCPU's fault counts under @label."""

    label: str

    def apply(self, side: Side) -> None:
        side.check(self.label)


Step = (
    Slot
    | SetFlags
    | MoveSlot
    | DeleteSlot
    | ManualProtect
    | Run
    | StorePte
    | GetDirtyLog
    | ClearDirtyLog
    | DontNeed
    | Collapse
    | SplitThp
    | Check
)


@attrs.frozen(kw_only=True)
class ConformScenario:
    name: str
    doc: str
    kernel: str  # the kernel functions whose behaviour the observations pin
    steps: tuple[Step, ...]
    layout: GuestLayout = attrs.field(factory=GuestLayout)
    nr_vcpus: int = 1


SCENARIOS: dict[str, Callable[[], ConformScenario]] = {}


def scenario(func: Callable[[], ConformScenario]) -> Callable[[], ConformScenario]:
    SCENARIOS[func.__name__] = func
    return func


def all_scenarios() -> list[ConformScenario]:
    return [f() for f in SCENARIOS.values()]


def _mk(
    func: Callable[..., object],
    steps: list[Step],
    kernel: str,
    layout: GuestLayout | None = None,
    nr_vcpus: int = 1,
) -> ConformScenario:
    return ConformScenario(
        name=func.__name__,
        doc=(func.__doc__ or "").strip(),
        kernel=kernel,
        steps=tuple(steps),
        layout=layout or GuestLayout(),
        nr_vcpus=nr_vcpus,
    )


def _regions(gpa: int, size: int) -> tuple[int, ...]:
    return tuple(range(gpa, gpa + size, HPAGE))


# --- guest page size and host backing ---------------------------------------------------


@scenario
def thp_guest_2m_read() -> ConformScenario:
    """Guest 2 MiB pages over THP, read: one 2M SPTE per frame, in the guest's PD shadow page."""
    size = 8 * MiB
    steps: list[Step] = [
        Run(0, 0),
        Check("boot"),
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "read"),
        Check("read"),
    ]
    return _mk(thp_guest_2m_read, steps, "FNAME(fetch), kvm_mmu_hugepage_adjust(), host_pfn_mapping_level()")


@scenario
def thp_guest_2m_write() -> ConformScenario:
    """Guest 2 MiB pages over THP, write then read: writes fault once per frame, the read is fault-free."""
    size = 8 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("write"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "read"),
        Check("read"),
    ]
    return _mk(thp_guest_2m_write, steps, "FNAME(fetch), make_spte() (dirty gpte: writable on first fault)")


@scenario
def thp_guest_4k_ptes() -> ConformScenario:
    """Guest 4 KiB PTEs over THP: an indirect shadow page per guest PT, 4K SPTEs, 8-entry prefetch."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "read"),
        Check("read"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("write"),
    ]
    return _mk(
        thp_guest_4k_ptes,
        steps,
        "FNAME(fetch), FNAME(pte_prefetch), account_shadowed()",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


@scenario
def host_4k_guest_2m() -> ConformScenario:
    """Guest 2 MiB pages over 4 KiB host pages: direct shadow pages under the guest's PDEs, 4K SPTEs."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size, "4k"),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "read"),
        Check("read_stride_32k"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("write_all"),
    ]
    return _mk(host_4k_guest_2m, steps, "FNAME(fetch) (direct child for a guest huge page), direct_pte_prefetch()")


@scenario
def host_4k_guest_4k_sparse() -> ConformScenario:
    """Guest 4 KiB PTEs over 4 KiB host pages, touched every 64 KiB: prefetch fills each 8-entry group."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size, "4k"),
        Run(TEST_GPA, TEST_GPA + size, 16 * PAGE, "write"),
        Check("write_stride_64k"),
    ]
    return _mk(
        host_4k_guest_4k_sparse,
        steps,
        "FNAME(pte_prefetch), FNAME(prefetch_gpte)",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


# --- alignment and slot edges --------------------------------------------------------------


@scenario
def thp_hva_misaligned() -> ConformScenario:
    """THP host memory whose hva is 4 KiB off the gpa modulo 2 MiB: no 2M SPTE anywhere."""
    size = 8 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size, "thp", misalign=PAGE),
        Run(TEST_GPA, TEST_GPA + size, 16 * PAGE, "write"),
        Check("write"),
    ]
    return _mk(thp_hva_misaligned, steps, "kvm_alloc_memslot_metadata() (gfn ^ ugfn disallows huge pages)")


@scenario
def thp_slot_edges_unaligned() -> ConformScenario:
    """A slot starting and ending 64 KiB inside 2 MiB frames, hva congruent: edges 4K, middle 2M."""
    gpa = TEST_GPA + HPAGE - 64 * 1024
    size = 4 * MiB + 128 * 1024
    steps: list[Step] = [
        Slot(1, gpa, size, "thp", misalign=HPAGE - 64 * 1024),
        Run(gpa, gpa + size, PAGE, "write"),
        Check("write"),
    ]
    return _mk(thp_slot_edges_unaligned, steps, "kvm_alloc_memslot_metadata() (partial first and last frames)")


@scenario
def thp_frame_shared_by_two_slots() -> ConformScenario:
    """Two slots meeting inside one 2 MiB frame: neither may map that frame huge, the other
    frames map 2M."""
    gpa = TEST_GPA
    split = 3 * MiB
    steps: list[Step] = [
        Slot(1, gpa, split, "thp"),
        Slot(2, gpa + split, 5 * MiB, "thp", misalign=1 * MiB),
        Run(gpa, gpa + 8 * MiB, 16 * PAGE, "write"),
        Check("written"),
    ]
    return _mk(thp_frame_shared_by_two_slots, steps, "kvm_alloc_memslot_metadata() (lpage_info edges)")


# --- dirty logging ----------------------------------------------------------------------


@scenario
def dirty_log_lazy_split() -> ConformScenario:
    """Enabling dirty logging write-protects the 2M SPTEs; each written frame is split lazily on its
    write fault; KVM_GET_DIRTY_LOG reports exactly the written pages and re-protects them."""
    size = 8 * MiB
    written = [0x3, 0x4, 0x200, 0x3FF, 0x5FF]
    steps: list[Step] = [Slot(1, TEST_GPA, size), Run(TEST_GPA, TEST_GPA + size, HPAGE, "read"), Check("mapped")]
    steps += [SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES), Check("logging_on")]
    steps += [Run(TEST_GPA + g * PAGE, TEST_GPA + g * PAGE + 1, PAGE, "write") for g in written]
    steps += [Check("written"), GetDirtyLog(1, "first"), Check("after_get")]
    steps += [Run(TEST_GPA + 4 * PAGE, TEST_GPA + 5 * PAGE, PAGE, "write"), GetDirtyLog(1, "second"), Check("end")]
    return _mk(
        dirty_log_lazy_split,
        steps,
        "kvm_mmu_slot_apply_flags(), kvm_mmu_slot_remove_write_access(), FNAME(fetch) drop_large_spte(), kvm_get_dirty_log_protect()",
    )


@scenario
def dirty_log_enabled_before_access() -> ConformScenario:
    """A slot logged from creation never gets a 2M SPTE: reads map 4K, writes are logged."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size, flags=KVM_MEM_LOG_DIRTY_PAGES),
        Run(TEST_GPA, TEST_GPA + size, 4 * PAGE, "read"),
        Check("read"),
        Run(TEST_GPA, TEST_GPA + size, 64 * PAGE, "write"),
        Check("write"),
        GetDirtyLog(1, "log"),
    ]
    return _mk(
        dirty_log_enabled_before_access,
        steps,
        "kvm_mmu_max_mapping_level() (dirty-tracked slot), mark_page_dirty_in_slot()",
    )


@scenario
def dirty_log_disable_recovers_huge() -> ConformScenario:
    """Disabling dirty logging zaps the collapsible 4K SPTEs; the next pass maps 2M again."""
    size = 8 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Run(TEST_GPA, TEST_GPA + size, 16 * PAGE, "write"),
        Check("logged_writes"),
        GetDirtyLog(1, "log"),
        SetFlags(1, 0),
        Check("logging_off"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("remapped"),
    ]
    return _mk(
        dirty_log_disable_recovers_huge, steps, "kvm_mmu_zap_collapsible_sptes(), kvm_mmu_zap_collapsible_spte()"
    )


@scenario
def dirty_log_guest_4k_ptes() -> ConformScenario:
    """Dirty logging under guest 4K PTEs: write-protect via rmaps, write faults restore W per page."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("mapped"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("logged_writes"),
        GetDirtyLog(1, "log"),
        Run(TEST_GPA, TEST_GPA + HPAGE, 32 * PAGE, "write"),
        GetDirtyLog(1, "log2"),
        Check("end"),
    ]
    return _mk(
        dirty_log_guest_4k_ptes,
        steps,
        "rmap_write_protect(), FNAME(page_fault) write fault on a write-protected 4K SPTE",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


@scenario
def dirty_log_disable_guest_4k_ptes() -> ConformScenario:
    """Disabling dirty logging zaps only SPTEs in direct shadow pages: under guest 4K PTEs
    (indirect shadow pages) kvm_mmu_zap_collapsible_spte() leaves every 4K SPTE in place."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("logged"),
        SetFlags(1, 0),
        Check("logging_off"),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("rewritten"),
    ]
    return _mk(
        dirty_log_disable_guest_4k_ptes,
        steps,
        "kvm_mmu_zap_collapsible_sptes(), kvm_mmu_zap_collapsible_spte() (sp->role.direct)",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


@scenario
def manual_protect_clear() -> ConformScenario:
    """Manual protect without initially-set: GET_DIRTY_LOG does not re-protect, CLEAR_DIRTY_LOG does."""
    size = 4 * MiB
    steps: list[Step] = [
        ManualProtect(1),
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Check("logging_on"),
        Run(TEST_GPA, TEST_GPA + HPAGE, 32 * PAGE, "write"),
        Check("written"),
        GetDirtyLog(1, "get1"),
        Run(TEST_GPA, TEST_GPA + HPAGE, 32 * PAGE, "write"),
        Check("rewritten_no_fault"),
        ClearDirtyLog(1, 0, 512, None),
        Check("cleared"),
        Run(TEST_GPA, TEST_GPA + 64 * PAGE, 32 * PAGE, "write"),
        GetDirtyLog(1, "get2"),
        Check("end"),
    ]
    return _mk(manual_protect_clear, steps, "kvm_get_dirty_log_protect() (manual), kvm_clear_dirty_log_protect()")


@scenario
def manual_protect_initially_set() -> ConformScenario:
    """Initially-set: enabling logging protects nothing and the bitmap starts full; CLEAR_DIRTY_LOG
    write-protects the 2M SPTEs covering the cleared pages, which then split on write."""
    size = 4 * MiB
    steps: list[Step] = [
        ManualProtect(3),
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Check("logging_on"),
        GetDirtyLog(1, "initial"),
        ClearDirtyLog(1, 0, 64, None),
        Check("cleared_64"),
        Run(TEST_GPA, TEST_GPA + size, 64 * PAGE, "write"),
        Check("written"),
        GetDirtyLog(1, "after_writes"),
    ]
    return _mk(
        manual_protect_initially_set,
        steps,
        "kvm_arch_mmu_enable_log_dirty_pt_masked() (initially-set: 2M write-protect), kvm_mmu_slot_apply_flags()",
    )


@scenario
def initially_set_clear_guest_4k_ptes() -> ConformScenario:
    """Initially-set under guest 4K PTEs: KVM_CLEAR_DIRTY_LOG write-protects exactly the cleared
    4K SPTEs through the rmaps, and only their next writes are logged and fault."""
    size = 4 * MiB
    steps: list[Step] = [
        ManualProtect(3),
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Check("logging_on"),
        ClearDirtyLog(1, 64, 128, tuple(range(0, 128, 3))),
        Check("cleared"),
        Run(TEST_GPA, TEST_GPA + size, 2 * PAGE, "write"),
        Check("written"),
        GetDirtyLog(1, "log"),
    ]
    return _mk(
        initially_set_clear_guest_4k_ptes,
        steps,
        "kvm_clear_dirty_log_protect(), kvm_mmu_write_protect_pt_masked(), kvm_mmu_slot_gfn_write_protect()",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


# --- MMU notifier -----------------------------------------------------------------------


@scenario
def dontneed_frame_zaps_2m() -> ConformScenario:
    """MADV_DONTNEED of a whole 2 MiB frame zaps its 2M SPTE; a write refaults a new THP as 2M."""
    size = 8 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        DontNeed(1, 2 * MiB, 2 * MiB),
        Check("dontneed"),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("refault"),
    ]
    return _mk(dontneed_frame_zaps_2m, steps, "kvm_mmu_notifier_invalidate_range_start(), kvm_unmap_gfn_range()")


@scenario
def dontneed_partial_then_collapse() -> ConformScenario:
    """MADV_DONTNEED of one 4 KiB page splits the host THP: the frame maps 4K after refault;
    MADV_COLLAPSE makes it huge again and the next access maps 2M."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        DontNeed(1, 0x10000, PAGE),
        Check("dontneed_4k"),
        Run(TEST_GPA, TEST_GPA + HPAGE, 64 * PAGE, "write"),
        Check("refault_4k"),
        Collapse(1, 0),
        Check("collapsed"),
        Run(TEST_GPA, TEST_GPA + HPAGE, 64 * PAGE, "write"),
        Check("refault_2m"),
    ]
    return _mk(
        dontneed_partial_then_collapse,
        steps,
        "kvm_unmap_gfn_range(), host_pfn_mapping_level(), MADV_COLLAPSE via the MMU notifier",
    )


@scenario
def dontneed_under_guest_4k_ptes() -> ConformScenario:
    """MADV_DONTNEED of 64 KiB under guest 4K PTEs zaps those SPTEs; refaults find no host page
    next to the freed ones, so prefetch maps nothing there."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("mapped"),
        DontNeed(1, 0x40000, 0x10000),
        Check("dontneed"),
        Run(TEST_GPA + 0x40000, TEST_GPA + 0x50000, 2 * PAGE, "write"),
        Check("refault"),
    ]
    return _mk(
        dontneed_under_guest_4k_ptes,
        steps,
        "kvm_unmap_gfn_range(), FNAME(pte_prefetch) (gfn_to_page_many_atomic() needs present host pages)",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


@scenario
def dontneed_4k_host_under_guest_4k_ptes() -> ConformScenario:
    """The same 64 KiB MADV_DONTNEED over 4 KiB host pages: no huge PMD to split, so KVM
    zaps only the 16 SPTEs of the freed range, with one flush."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size, "4k"),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("mapped"),
        DontNeed(1, 0x40000, 0x10000),
        Check("dontneed"),
        Run(TEST_GPA + 0x40000, TEST_GPA + 0x50000, 2 * PAGE, "write"),
        Check("refault"),
    ]
    return _mk(
        dontneed_4k_host_under_guest_4k_ptes,
        steps,
        "kvm_unmap_gfn_range() for exactly the zapped hva range",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


@scenario
def mprotect_splits_thp() -> ConformScenario:
    """A host THP split (mprotect() of one page inside it) zaps the frame's 2M SPTE through the
    MMU notifier; the guest's next writes map that frame 4K, the other frame stays 2M."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        SplitThp(1, HPAGE + 0x3000),
        Check("split"),
        Run(TEST_GPA, TEST_GPA + size, 32 * PAGE, "write"),
        Check("rewritten"),
    ]
    return _mk(mprotect_splits_thp, steps, "kvm_unmap_gfn_range() from __split_huge_pmd(), host_pfn_mapping_level()")


@scenario
def mprotect_split_under_guest_4k_ptes() -> ConformScenario:
    """The same host THP split under guest 4K PTEs: every SPTE of the frame is zapped, and the
    guest's next writes remap it 4K."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("mapped"),
        SplitThp(1, HPAGE + 0x3000),
        Check("split"),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("rewritten"),
    ]
    return _mk(
        mprotect_split_under_guest_4k_ptes,
        steps,
        "kvm_unmap_gfn_range() from change_protection() and __split_huge_pmd()",
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, size)),
    )


# --- several slots, deletion, vCPUs -------------------------------------------------------------


@scenario
def two_slots_delete_one() -> ConformScenario:
    """Two slots (THP and 4K); deleting one zaps every shadow page (kvm_mmu_zap_all_fast()),
    including the guest page-table shadows, which the next pass rebuilds."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Slot(2, TEST_GPA + 16 * MiB, size, "4k"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Run(TEST_GPA + 16 * MiB, TEST_GPA + 16 * MiB + size, 8 * PAGE, "write"),
        Check("both_mapped"),
        DeleteSlot(2),
        Check("deleted"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "write"),
        Check("rebuilt"),
    ]
    return _mk(
        two_slots_delete_one, steps, "kvm_invalidate_memslot(), kvm_arch_flush_shadow_memslot(), kvm_mmu_zap_all_fast()"
    )


@scenario
def two_vcpus_shared_root() -> ConformScenario:
    """Two vCPUs with the same CR3 share one shadow root; each takes the faults for its half."""
    size = 8 * MiB
    half = size // 2
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + half, PAGE, "write", vcpu=0),
        Check("vcpu0"),
        Run(TEST_GPA + half, TEST_GPA + size, PAGE, "write", vcpu=1),
        Check("vcpu1"),
        Run(TEST_GPA, TEST_GPA + size, PAGE, "read", vcpu=1),
        Check("vcpu1_reads_all"),
    ]
    return _mk(
        two_vcpus_shared_root,
        steps,
        "kvm_mmu_get_shadow_page() (root reuse by role and gfn), FNAME(page_fault)",
        nr_vcpus=2,
        layout=GuestLayout(pte_regions=_regions(TEST_GPA, HPAGE)),
    )


@scenario
def slot_delete_and_recreate_logged() -> ConformScenario:
    """Delete a THP slot and recreate it dirty-logged at the same gpa: the old mapping is gone,
    the new one maps 4K and logs every write."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        DeleteSlot(1),
        Check("deleted"),
        Slot(3, TEST_GPA, size, flags=KVM_MEM_LOG_DIRTY_PAGES),
        Run(TEST_GPA, TEST_GPA + size, 128 * PAGE, "write"),
        Check("recreated"),
        GetDirtyLog(3, "log"),
    ]
    return _mk(slot_delete_and_recreate_logged, steps, "kvm_set_memslot() (delete, create), kvm_mmu_zap_all_fast()")


@scenario
def memslot_move() -> ConformScenario:
    """Moving a slot to a new gpa (KVM_MR_MOVE) zaps everything; the guest then maps the new range."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        MoveSlot(1, TEST_GPA + 32 * MiB),
        Check("moved"),
        Run(TEST_GPA + 32 * MiB, TEST_GPA + 32 * MiB + size, PAGE, "write"),
        Check("remapped"),
    ]
    return _mk(memslot_move, steps, "kvm_set_memslot() (KVM_MR_MOVE), kvm_invalidate_memslot()")


@scenario
def guest_alias_two_gvas_one_gfn() -> ConformScenario:
    """Two guest virtual ranges map one gfn range through two guest PTs: every gfn gets two
    SPTEs in its rmap (max_mmu_rmap_size), dirty logging write-protects both, and a write
    through the alias is logged at the shared gfn."""
    size = 2 * MiB
    alias = TEST_GPA + 32 * MiB
    layout = GuestLayout(pte_regions=(TEST_GPA, alias), aliases=((alias, TEST_GPA),))
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Run(alias, alias + size, 8 * PAGE, "read"),
        Check("both_mapped"),
        SetFlags(1, KVM_MEM_LOG_DIRTY_PAGES),
        Check("logging_on"),
        Run(alias + 5 * PAGE, alias + 6 * PAGE, PAGE, "write"),
        Run(TEST_GPA + 5 * PAGE, TEST_GPA + 6 * PAGE, PAGE, "write"),
        Check("written_twice"),
        GetDirtyLog(1, "log"),
    ]
    return _mk(
        guest_alias_two_gvas_one_gfn,
        steps,
        "rmap_add() (pte_list_add()), rmap_write_protect(), FNAME(fetch)",
        layout=layout,
    )


# --- the guest writes its own page tables ----------------------------------------------------


@scenario
def thp_frame_holding_guest_pt() -> ConformScenario:
    """A guest page table inside a THP frame the guest maps with a 2 MiB page: shadowing the table
    write-protects the frame's 2M SPTE and disallows huge pages there (account_shadowed()), so the
    next write fault drops the 2M SPTE and maps that frame 4K."""
    size = 8 * MiB
    region = TEST_GPA + 6 * MiB
    # The PT sits 17 pages into the first frame, where no pass below writes.
    layout = GuestLayout(pte_regions=(region,), pt_base=TEST_GPA + 17 * PAGE)
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + 6 * MiB, HPAGE, "write"),
        Check("huge_frames_mapped"),
        Run(region, region + HPAGE, 16 * PAGE, "write"),
        Check("pt_shadowed"),
        Run(TEST_GPA, TEST_GPA + 6 * MiB, 64 * PAGE, "write"),
        Check("rewritten"),
    ]
    return _mk(
        thp_frame_holding_guest_pt,
        steps,
        "account_shadowed(), kvm_mmu_gfn_disallow_lpage(), kvm_mmu_slot_gfn_write_protect(), FNAME(fetch)",
        layout=layout,
    )


@scenario
def guest_pd_store_emulated() -> ConformScenario:
    """A guest store into its page directory (shadowed at level 2, so write-tracked and never
    unsync) is emulated: kvm_mmu_track_write() counts mmu_pte_write."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        StorePte(PD_GPA, 300),
        Check("pd_store"),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("after"),
    ]
    return _mk(
        guest_pd_store_emulated,
        steps,
        "page_fault_handle_page_track(), kvm_mmu_track_write(), x86_emulate_instruction()",
    )


@scenario
def guest_pd_store_byte() -> ConformScenario:
    """A one-byte guest store into its page directory: emulated like an 8-byte one, but
    mmu_pte_write_fetch_gpte() reads no new gpte for a 1-byte write (gentry = 0), so the
    zapped entry is not counted in mmu_pde_zapped."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        StorePte(PD_GPA, 300, width=1),
        Check("pd_store"),
    ]
    return _mk(guest_pd_store_byte, steps, "kvm_mmu_track_write(), mmu_pte_write_fetch_gpte()")


@scenario
def guest_pd_stores_do_not_flood() -> ConformScenario:
    """Three emulated stores into the page directory do not count as write flooding: each
    store's own fault walks through the directory's shadow page, and
    shadow_page_table_clear_flood() resets its count before kvm_mmu_track_write() bumps it."""
    size = 4 * MiB
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("mapped"),
        StorePte(PD_GPA, 300),
        StorePte(PD_GPA, 301),
        Check("two_stores"),
        StorePte(PD_GPA, 302),
        Check("third_store"),
        Run(TEST_GPA, TEST_GPA + size, HPAGE, "write"),
        Check("after"),
    ]
    return _mk(
        guest_pd_stores_do_not_flood,
        steps,
        "page_fault_handle_page_track(), shadow_page_table_clear_flood(), detect_write_flooding()",
    )


@scenario
def guest_pt_store_unsync() -> ConformScenario:
    """A guest store into a last-level page table lets its shadow page go unsync
    (mmu_try_to_unsync_pages()) instead of emulating; the store itself needs no emulation."""
    size = 4 * MiB
    layout = GuestLayout(pte_regions=_regions(TEST_GPA, size))
    steps: list[Step] = [
        Slot(1, TEST_GPA, size),
        Run(TEST_GPA, TEST_GPA + size, 8 * PAGE, "write"),
        Check("mapped"),
        StorePte(layout.pt_gpa(TEST_GPA), 511),
        Check("pt_store"),
        Run(TEST_GPA, TEST_GPA + 256 * PAGE, 8 * PAGE, "write"),
        Check("after"),
    ]
    return _mk(guest_pt_store_unsync, steps, "mmu_try_to_unsync_pages(), kvm_unsync_page(), make_spte()", layout=layout)
