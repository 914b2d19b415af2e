"""Unit tests for kvmsplit/realkvm/guest.py: the hand-assembled loop and the page tables."""

from __future__ import annotations

import struct

import pytest

from kvmsplit.kvm import Kvm, KvmConfig
from kvmsplit.realkvm import guest as g
from kvmsplit.trace import validate_op

MiB = 1 << 20


def test_loop_reads_the_mailbox_first_and_ends_each_pass_at_the_mmio_address() -> None:
    code = g.mailbox_loop()
    # mov rsi, [0x7000]: the first instruction re-reads the mailbox on every pass.
    assert code[:8] == b"\x48\x8b\x34\x25" + struct.pack("<I", g.MAILBOX_GPA)
    store = b"\xc6\x04\x25" + struct.pack("<I", g.MMIO_GPA) + b"\x00"
    at = code.index(store)
    # The backward jump after the store lands on offset 0.
    jmp = code[at + len(store) : at + len(store) + 2]
    assert jmp[0] == 0xEB
    assert at + len(store) + 2 + struct.unpack("<b", jmp[1:])[0] == 0


def test_loop_fits_in_one_page() -> None:
    assert (g.CODE_GPA & 0xFFF) + len(g.mailbox_loop()) <= 4096


def _model_tables(layout: g.GuestLayout) -> dict[int, list[int]]:
    kvm = Kvm.create(KvmConfig.named("shadow"))
    system_slot = {"op": "kvm_set_user_memory_region", "slot": 0, "gpa": 0, "size": g.SYS_SIZE, "hva": 1 << 40}
    for op in [{**system_slot, "backing": "4k"}, *layout.model_ops()]:
        spec, args = validate_op(0, op)
        spec.run(kvm, **args)
    return kvm.guest_tables


@pytest.mark.parametrize(
    "layout",
    [
        g.GuestLayout(),
        g.GuestLayout(pte_regions=(64 * MiB, 66 * MiB)),
        g.GuestLayout(pte_regions=(70 * MiB,), pt_base=64 * MiB + 17 * 4096),
        g.GuestLayout(pte_regions=(0x3FC00000, 0)),
        g.GuestLayout(pte_regions=(64 * MiB, 96 * MiB), aliases=((96 * MiB, 64 * MiB),)),
    ],
)
def test_model_tables_equal_the_guest_tables_byte_for_byte(layout: g.GuestLayout) -> None:
    """The model shadows exactly the tables the real guest walks, so its counts are comparable."""
    image = layout.system_image()
    tables = _model_tables(layout)
    table_gpas = [g.PML4_GPA, g.PDPT_GPA, g.PD_GPA] + [layout.pt_gpa(r) for r in layout.pte_regions]
    assert sorted(tables) == sorted(gpa >> 12 for gpa in table_gpas)
    for gpa in table_gpas:
        real = list(struct.unpack("<512Q", image[gpa].ljust(4096, b"\0")))
        assert tables[gpa >> 12] == real, f"table at {gpa:#x} differs"


def test_layout_rejects_unaligned_regions() -> None:
    with pytest.raises(ValueError, match="2 MiB aligned"):
        g.GuestLayout(pte_regions=(64 * MiB + 4096,))


def test_an_alias_needs_a_4k_region() -> None:
    with pytest.raises(ValueError, match="alias"):
        g.GuestLayout(pte_regions=(), aliases=((96 * MiB, 64 * MiB),))


def test_sregs_are_64_bit_cpl3_with_cr3_at_the_pml4() -> None:
    sregs = g.cpl3_sregs(bytes(312))
    cs = struct.unpack("<QIHBBBBBBBBBx", sregs[:24])
    selector, present, dpl, long_mode = cs[2], cs[4], cs[5], cs[8]
    assert (selector, dpl, long_mode, present) == (0x33, 3, 1, 1)
    ctrl = struct.unpack_from("<6Q", sregs, 8 * 24 + 32)
    assert (ctrl[0], ctrl[2], ctrl[3], ctrl[5]) == (g.CR0, g.PML4_GPA, g.CR4, g.EFER)
