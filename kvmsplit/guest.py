"""Model: guest-owned page tables, the input that paging_tmpl.h shadows.

Two formats, as arch/x86/kvm/mmu/paging_tmpl.h instantiates them: the 64-bit
x86 format (shadow paging of L1) and EPT (L1's EPT tables for an L2 guest).
Only pages used as guest page tables have contents in the model
(`Kvm.guest_tables`, gfn -> 512 gptes); other guest memory has no contents.

Model: 4-level guest paging only (no 32-bit, PAE or 5-level guests), and
the guest's accessed/dirty bits are not written by KVM's walk
(FNAME(update_accessed_dirty_bits) is not modelled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from kvmsplit.errors import HarnessError
from kvmsplit.spte import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_HPAGE_GFN_SHIFT,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_RWX_MASK,
    VMX_EPT_WRITABLE_MASK,
)

if TYPE_CHECKING:
    from kvmsplit.kvm import Kvm


@attrs.frozen
class GptFormat:
    """One instantiation of paging_tmpl.h (PTTYPE 64 or PTTYPE_EPT)."""

    name: str

    @property
    def ept(self) -> bool:
        return self.name == "ept"

    def is_present_gpte(self, gpte: int) -> bool:
        if self.ept:
            return bool(gpte & VMX_EPT_RWX_MASK)
        return bool(gpte & PT_PRESENT_MASK)

    def gpte_access(self, gpte: int) -> int:
        """FNAME(gpte_access)."""
        if self.ept:
            return (
                (ACC_WRITE_MASK if gpte & VMX_EPT_WRITABLE_MASK else 0)
                | (ACC_EXEC_MASK if gpte & VMX_EPT_EXECUTABLE_MASK else 0)
                | (ACC_USER_MASK if gpte & VMX_EPT_READABLE_MASK else 0)
            )
        access = gpte & (PT_WRITABLE_MASK | PT_USER_MASK | PT_PRESENT_MASK)
        # Bit 0 (P) becomes ACC_EXEC_MASK, flipped by NX.
        return access ^ ((gpte & PT64_NX_MASK) >> 63)

    def is_last_gpte(self, level: int, gpte: int) -> bool:
        return level == PG_LEVEL_4K or bool(gpte & PT_PAGE_SIZE_MASK)

    def gpte_to_gfn_lvl(self, gpte: int, level: int) -> int:
        return ((gpte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT) & ~(KVM_PAGES_PER_HPAGE(level) - 1)

    def make_gpte(self, gfn: int, access: int, level: int = PG_LEVEL_4K, large: bool = False) -> int:
        """Model: build a guest PTE granting @access (ACC_*) at @gfn.

        Accessed and dirty are set, because the model's walk does not set
        them (FNAME(update_accessed_dirty_bits) is not modelled).
        """
        g = gfn << PAGE_SHIFT
        if self.ept:
            g |= (1 << 8) | (1 << 9)
            if access & ACC_USER_MASK:
                g |= VMX_EPT_READABLE_MASK
            if access & ACC_WRITE_MASK:
                g |= VMX_EPT_WRITABLE_MASK
            if access & ACC_EXEC_MASK:
                g |= VMX_EPT_EXECUTABLE_MASK
        else:
            g |= PT_PRESENT_MASK | (1 << 5) | (1 << 6)
            if access & ACC_WRITE_MASK:
                g |= PT_WRITABLE_MASK
            if access & ACC_USER_MASK:
                g |= PT_USER_MASK
            if not access & ACC_EXEC_MASK:
                g |= PT64_NX_MASK
        if large:
            g |= PT_PAGE_SIZE_MASK
        return g


X86_GPT = GptFormat("x86")
EPT_GPT = GptFormat("ept")


@attrs.define
class GuestWalker:
    """struct guest_walker: what FNAME(walk_addr_generic) found."""

    level: int
    gfn: int
    pte_access: int
    # Indexed by level: the table's gfn, the access granted above it, the gpte read.
    table_gfn: dict[int, int] = attrs.field(factory=dict)
    pt_access: dict[int, int] = attrs.field(factory=dict)
    ptes: dict[int, int] = attrs.field(factory=dict)


def guest_walk(kvm: Kvm, fmt: GptFormat, root_gfn: int, addr: int) -> GuestWalker | None:
    """FNAME(walk_addr_generic) without permission checks; None if not present."""
    table = root_gfn
    access = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK
    w = GuestWalker(level=0, gfn=0, pte_access=0)
    level = PT64_ROOT_4LEVEL
    while True:
        gptes = kvm.guest_tables.get(table)
        if gptes is None:
            # The table gfn holds no page table: the model reads it as all zero.
            return None
        index = (addr >> (PAGE_SHIFT + KVM_HPAGE_GFN_SHIFT(level))) & 511
        gpte = gptes[index]
        w.table_gfn[level] = table
        w.pt_access[level] = access
        w.ptes[level] = gpte
        if not fmt.is_present_gpte(gpte):
            return None
        access &= fmt.gpte_access(gpte)
        if fmt.is_last_gpte(level, gpte):
            break
        table = fmt.gpte_to_gfn_lvl(gpte, PG_LEVEL_4K)
        level -= 1
    w.level = level
    w.pte_access = access
    offset = (addr >> PAGE_SHIFT) & (KVM_PAGES_PER_HPAGE(level) - 1)
    w.gfn = fmt.gpte_to_gfn_lvl(gpte, level) + offset
    return w


def guest_build_identity_map(
    kvm: Kvm,
    fmt: GptFormat,
    *,
    root_gfn: int,
    table_gfns: list[int],
    gfn_start: int,
    npages: int,
    page_level: int,
    access: int = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK,
) -> None:
    """Model: lay out 4-level guest page tables mapping addr == gpa.

    Tables go at @root_gfn and then at @table_gfns in order, as a guest
    kernel would write them before any of it is shadowed.
    """
    if page_level not in (1, 2, 3):
        raise HarnessError(f"guest_build_identity_map: page_level {page_level!r} is not 1, 2 or 3")
    span = KVM_PAGES_PER_HPAGE(page_level)
    if gfn_start % span or npages % span:
        raise HarnessError(
            f"guest_build_identity_map: gfn {gfn_start:#x}+{npages:#x} is not aligned to level {page_level}"
        )
    free = list(table_gfns)
    kvm.guest_tables.setdefault(root_gfn, [0] * 512)

    def child_table(table: int, level: int, gfn: int) -> int:
        gptes = kvm.guest_tables[table]
        index = (gfn >> KVM_HPAGE_GFN_SHIFT(level)) & 511
        if fmt.is_present_gpte(gptes[index]):
            return fmt.gpte_to_gfn_lvl(gptes[index], PG_LEVEL_4K)
        if not free:
            raise HarnessError("guest_build_identity_map: ran out of table gfns")
        new = free.pop(0)
        kvm.guest_tables[new] = [0] * 512
        gptes[index] = fmt.make_gpte(new, ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK)
        return new

    for gfn in range(gfn_start, gfn_start + npages, span):
        table = root_gfn
        for level in range(PT64_ROOT_4LEVEL, page_level, -1):
            table = child_table(table, level, gfn)
        index = (gfn >> KVM_HPAGE_GFN_SHIFT(page_level)) & 511
        kvm.guest_tables[table][index] = fmt.make_gpte(gfn, access, page_level, large=page_level > 1)
