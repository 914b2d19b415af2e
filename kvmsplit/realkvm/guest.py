"""The mailbox guest: a 64-bit CPL3 loop, its GDT and identity-mapped page tables.

Under the PVM vendor module only CPL3 code runs natively (CPL0 code is
emulated and never creates shadow PTEs), so the guest is a user-mode loop.
It cannot use `out` or `hlt` (both #GP at CPL3); it ends each pass with a
one-byte store to MMIO_GPA, which lies inside the identity map but outside
every memslot, so KVM exits with KVM_EXIT_MMIO and the next KVM_RUN
continues the loop.  Each pass re-reads the mailbox first, so userspace
never changes registers while an MMIO completion is pending.

Guest physical layout (the system slot, 2 MiB at gpa 0, 4 KiB backed):

    0x0500  GDT                0x1000  PML4 (CR3)
    0x0600  TSS (never used)   0x2000  PDPT
    0x7000  mailbox            0x3000  PD: 512 x 2 MiB, or a 4 KiB PT
    0x8200  the loop                   for each region asked for
    1 MiB.. page tables (PT i at PT_GPA + i * 4 KiB)

The identity map covers the first GiB.  Every guest PTE has A and D set,
so KVM's walker never writes guest page tables
(FNAME(update_accessed_dirty_bits)), matching the model's guest tables
(kvmsplit.guest.GptFormat.make_gpte()).
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

from kvmsplit.realkvm import ioctls as k

MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096
HPAGE_SIZE = 2 * MiB

SYS_SLOT = 0
SYS_SIZE = 2 * MiB
GDT_GPA = 0x500
TSS_GPA = 0x600
PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000
MAILBOX_GPA = 0x7000
CODE_GPA = 0x8200
PT_GPA = 1 * MiB
MAX_PTS = (SYS_SIZE - PT_GPA) // PAGE_SIZE
MMIO_GPA = 0x3FE0_0000
IDENTITY_MAP_SIZE = 1 * GiB

MAILBOX_OP_WRITE, MAILBOX_OP_READ, MAILBOX_OP_STORE = 0, 1, 2

# x86 paging bits; leaves and tables alike get P|RW|U|A|D, as the model's
# make_gpte() does for access ACC_ALL.
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
PTE_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
PTE_LEAF_4K = PTE_TABLE
PTE_LEAF_2M = PTE_TABLE | PTE_PS

CR0 = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
CR4 = 0x10620  # FSGSBASE | OSXMMEXCPT | OSFXSR | PAE: the value measured to run natively under PVM
EFER = 0xD01  # NXE | LMA | LME | SCE
RFLAGS = 0x2  # reserved bit 1 only; IF=0, IOPL=0

USER_CS, USER_DS, TSS_SEL = 0x33, 0x2B, 0x40


# --- the loop, assembled by hand ----------------------------------------------------


def _rel8(src_end: int, target: int) -> int:
    d = target - src_end
    if not -128 <= d <= 127:
        raise ValueError(f"jump of {d} bytes does not fit rel8")
    return d & 0xFF


def mailbox_loop(base: int = CODE_GPA) -> bytes:
    """The guest loop as machine code.  rsi = cursor, rdi = end, rcx = stride, rdx = op.

    Op 0 writes byte 1 every stride bytes, op 1 reads, op 2 stores the
    mailbox's qword value once at lo (an 8-byte guest PTE update).
    """
    mb = MAILBOX_GPA
    disp = lambda v: struct.pack("<I", v)  # noqa: E731
    code = bytearray()
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str]] = []

    def emit(data: bytes) -> None:
        code.extend(data)

    def jcc(opcode: int, label: str) -> None:
        code.append(opcode)
        code.append(0)
        fixups.append((len(code) - 1, label))

    labels["loop"] = len(code)
    emit(b"\x48\x8b\x34\x25" + disp(mb + 0))  # mov rsi, [mailbox.lo]: REX.W 8B /r, ModRM 00 110 100, SIB disp32
    emit(b"\x48\x8b\x3c\x25" + disp(mb + 8))  # mov rdi, [mailbox.hi]: ModRM 00 111 100
    emit(b"\x48\x8b\x0c\x25" + disp(mb + 16))  # mov rcx, [mailbox.stride]: ModRM 00 001 100
    emit(b"\x48\x8b\x14\x25" + disp(mb + 24))  # mov rdx, [mailbox.op]: ModRM 00 010 100
    emit(b"\x48\x39\xfe")  # cmp rsi, rdi: 39 /r, ModRM 11 111 110
    jcc(0x73, "done")  # jae done: an empty range still ends the pass
    emit(b"\x48\x83\xfa\x01")  # cmp rdx, 1: REX.W 83 /7 ib, ModRM 11 111 010
    jcc(0x74, "read")  # je read: op 1 reads
    emit(b"\x48\x83\xfa\x02")  # cmp rdx, 2
    jcc(0x74, "store")  # je store: op 2 stores one qword
    labels["write"] = len(code)
    emit(b"\xc6\x06\x01")  # mov byte [rsi], 1: C6 /0 ib, ModRM 00 000 110
    emit(b"\x48\x01\xce")  # add rsi, rcx: 01 /r, ModRM 11 001 110
    emit(b"\x48\x39\xfe")  # cmp rsi, rdi
    jcc(0x72, "write")  # jb write
    jcc(0xEB, "done")  # jmp done
    labels["read"] = len(code)
    emit(b"\x8a\x06")  # mov al, [rsi]: 8A /r, ModRM 00 000 110
    emit(b"\x48\x01\xce")  # add rsi, rcx
    emit(b"\x48\x39\xfe")  # cmp rsi, rdi
    jcc(0x72, "read")  # jb read
    jcc(0xEB, "done")  # jmp done
    labels["store"] = len(code)
    emit(b"\x48\x8b\x04\x25" + disp(mb + 32))  # mov rax, [mailbox.value]: ModRM 00 000 100, SIB disp32
    emit(b"\x48\x89\x06")  # mov [rsi], rax: an 8-byte store, as a guest kernel writes a PTE
    labels["done"] = len(code)
    emit(b"\xc6\x04\x25" + disp(MMIO_GPA) + b"\x00")  # mov byte [MMIO_GPA], 0: the KVM_EXIT_MMIO ending a pass
    jcc(0xEB, "loop")  # jmp loop: re-read the mailbox on the next KVM_RUN
    for at, label in fixups:
        code[at] = _rel8(at + 1, labels[label])
    if (base & 0xFFF) + len(code) > PAGE_SIZE:
        raise ValueError("the loop must fit in one guest page, so every pass fetches from one gfn")
    return bytes(code)


# --- descriptors and page tables ----------------------------------------------------------


def _gdt() -> bytes:
    entries = [
        0,  # 0x00 null
        0,  # 0x08 unused
        0x00AF9B000000FFFF,  # 0x10 kernel code64 (L=1, DPL0)
        0x00CF93000000FFFF,  # 0x18 kernel data
        0x00CFFB000000FFFF,  # 0x20 user code32 (selector 0x23)
        0x00CFF3000000FFFF,  # 0x28 user data (selector 0x2b)
        0x00AFFB000000FFFF,  # 0x30 user code64 (selector 0x33)
        0,  # 0x38 unused
        # 0x40 busy 64-bit TSS at TSS_GPA, limit 0x67: the low and high halves
        0x67 | (TSS_GPA << 16) | (0x8B << 40),
        0,
    ]
    return b"".join(struct.pack("<Q", e) for e in entries)


@attrs.frozen(kw_only=True)
class GuestLayout:
    """Which 2 MiB regions of the identity map use 4 KiB PTEs; the rest are 2 MiB PDEs."""

    pte_regions: tuple[int, ...] = ()  # 2 MiB aligned gpas, in PT order
    # Where the PTs go: the system slot by default, or a test slot, whose
    # frame then holds a write-tracked guest page table.
    pt_base: int = PT_GPA
    # (region, target): the region's PT maps target.. instead of itself, so two
    # guest virtual ranges alias one gfn range.
    aliases: tuple[tuple[int, int], ...] = ()

    def __attrs_post_init__(self) -> None:
        for region, target in self.aliases:
            if region not in self.pte_regions or target % HPAGE_SIZE:
                raise ValueError(f"GuestLayout: alias {region:#x} -> {target:#x} needs a 4K region and a 2 MiB target")
        if self.pt_base == PT_GPA and len(self.pte_regions) > MAX_PTS:
            raise ValueError(f"GuestLayout: {len(self.pte_regions)} 4K regions exceed the {MAX_PTS} PT pages")
        if self.pt_base % PAGE_SIZE or (self.pt_base != PT_GPA and self.pt_base < SYS_SIZE):
            raise ValueError(f"GuestLayout: PT base {self.pt_base:#x} is not a page above the system slot")
        for gpa in self.pte_regions:
            if gpa % HPAGE_SIZE or not 0 <= gpa < IDENTITY_MAP_SIZE:
                raise ValueError(f"GuestLayout: region {gpa:#x} is not a 2 MiB aligned gpa below 1 GiB")

    def pt_gpa(self, region: int) -> int:
        return self.pt_base + self.pte_regions.index(region) * PAGE_SIZE

    def system_image(self) -> dict[int, bytes]:
        """gpa -> bytes the host stores before the guest runs (PTs may lie outside the system slot)."""
        image: dict[int, bytes] = {
            GDT_GPA: _gdt(),
            PML4_GPA: struct.pack("<Q", PDPT_GPA | PTE_TABLE),
            PDPT_GPA: struct.pack("<Q", PD_GPA | PTE_TABLE),
            MAILBOX_GPA: bytes(40),
            CODE_GPA: mailbox_loop(),
        }
        pd = bytearray()
        for i in range(512):
            gpa = i * HPAGE_SIZE
            if gpa in self.pte_regions:
                pd += struct.pack("<Q", self.pt_gpa(gpa) | PTE_TABLE)
            else:
                pd += struct.pack("<Q", gpa | PTE_LEAF_2M)
        image[PD_GPA] = bytes(pd)
        targets = dict(self.aliases)
        for region in self.pte_regions:
            target = targets.get(region, region)
            image[self.pt_gpa(region)] = b"".join(
                struct.pack("<Q", (target + j * PAGE_SIZE) | PTE_LEAF_4K) for j in range(512)
            )
        return image

    def model_ops(self) -> list[dict[str, Any]]:
        """The same tables for the model, as trace operations.

        guest_build_identity_map() hands out table gfns in the order it needs
        them (PDPT, PD, then one PT per 4K region), so the 4K regions are laid
        out first, then 2 MiB pages fill the gaps.
        """
        ops: list[dict[str, Any]] = []
        first_tables = [PDPT_GPA >> 12, PD_GPA >> 12]
        pts = [self.pt_gpa(r) >> 12 for r in self.pte_regions]
        if self.pte_regions:
            for i, region in enumerate(self.pte_regions):
                ops.append(_identity_op(first_tables + pts[i:] if i == 0 else pts[i:], region >> 12, 512, 1))
                first_tables = []
        gap_start = 0
        for region in [*sorted(self.pte_regions), IDENTITY_MAP_SIZE]:
            if region > gap_start:
                ops.append(_identity_op(first_tables, gap_start >> 12, (region - gap_start) >> 12, 2))
                first_tables = []
            gap_start = region + HPAGE_SIZE
        for region, target in self.aliases:
            ops.append(
                {
                    "op": "guest_store_table",
                    "format": "x86",
                    "gfn": self.pt_gpa(region) >> 12,
                    "first_gfn": target >> 12,
                }
            )
        return ops


def _identity_op(tables: list[int], gfn_start: int, npages: int, level: int) -> dict[str, Any]:
    return {
        "op": "guest_build_identity_map",
        "format": "x86",
        "root_gfn": PML4_GPA >> 12,
        "table_gfns": tables,
        "gfn_start": gfn_start,
        "npages": npages,
        "page_level": level,
    }


# --- register state --------------------------------------------------------------------


def _segment(
    selector: int,
    seg_type: int,
    *,
    s: int,
    long: int,
    db: int,
    dpl: int,
    base: int = 0,
    limit: int = 0xFFFFFFFF,
    g: int = 1,
) -> bytes:
    """A present kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable."""
    return k.KVM_SEGMENT.pack(base, limit, selector, seg_type, 1, dpl, db, s, long, g, 0, 0)


def cpl3_sregs(current: bytes) -> bytes:
    """struct kvm_sregs for 64-bit CPL3 with CR3 at PML4_GPA; keeps apic_base from @current."""
    cs = _segment(USER_CS, 11, s=1, long=1, db=0, dpl=3)
    data = _segment(USER_DS, 3, s=1, long=0, db=1, dpl=3)
    tr = _segment(TSS_SEL, 11, s=0, long=0, db=0, dpl=0, base=TSS_GPA, limit=0x67, g=0)
    ldt = k.KVM_SEGMENT.pack(0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1)  # unusable
    segs = cs + data + data + data + data + data + tr + ldt  # cs ds es fs gs ss tr ldt
    gdt = k.KVM_DTABLE.pack(GDT_GPA, len(_gdt()) - 1)
    idt = k.KVM_DTABLE.pack(0, 0)  # no IDT: any guest exception becomes a triple fault
    ctrl_off = 8 * k.KVM_SEGMENT.size + 2 * k.KVM_DTABLE.size
    apic_base = struct.unpack_from("<Q", current, ctrl_off + 6 * 8)[0]
    ctrl = struct.pack("<7Q", CR0, 0, PML4_GPA, CR4, 0, EFER, apic_base)
    out = segs + gdt + idt + ctrl + bytes(32)
    assert len(out) == k.KVM_SREGS_SIZE
    return out


def cpl3_regs() -> list[int]:
    """rax..r15 zero, rip at the loop, rflags with only the reserved bit."""
    regs = [0] * 18
    regs[16] = CODE_GPA
    regs[17] = RFLAGS
    return regs


def mailbox(lo: int, hi: int, stride: int, op: int, value: int = 0) -> bytes:
    """The mailbox: lo, hi, stride, op (0 write byte 1, 1 read, 2 store @value at lo), value."""
    return struct.pack("<5Q", lo, hi, stride, op, value)
