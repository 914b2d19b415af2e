"""Unit tests for kvmsplit/guest.py (Model: guest page tables, as paging_tmpl.h reads them)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmsplit.errors import HarnessError
from kvmsplit.guest import EPT_GPT, X86_GPT, GptFormat, guest_build_identity_map, guest_walk
from kvmsplit.kvm import Kvm
from kvmsplit.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_WRITABLE_MASK,
)
from tests.strategies import acc_bits

FORMATS = [X86_GPT, EPT_GPT]
format_ids = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)

ROOT_GFN = 0x10
TABLE_GFNS = list(range(0x20, 0x40))


# --- FNAME(gpte_access). ------------------------------------------------------------


@pytest.mark.parametrize("rwx", range(8))
def test_ept_gpte_access_maps_r_to_user_w_to_write_x_to_exec(rwx: int) -> None:
    gpte = (0x1234 << PAGE_SHIFT) | rwx
    expected = (
        (ACC_USER_MASK if rwx & VMX_EPT_READABLE_MASK else 0)
        | (ACC_WRITE_MASK if rwx & VMX_EPT_WRITABLE_MASK else 0)
        | (ACC_EXEC_MASK if rwx & VMX_EPT_EXECUTABLE_MASK else 0)
    )
    assert EPT_GPT.gpte_access(gpte) == expected


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("nx", [False, True])
def test_x86_gpte_access_takes_w_and_u_and_exec_unless_nx(writable: bool, user: bool, nx: bool) -> None:
    """FNAME(gpte_access) for 64-bit PTEs: P becomes ACC_EXEC_MASK, NX takes it away."""
    gpte = (0x1234 << PAGE_SHIFT) | PT_PRESENT_MASK
    gpte |= (PT_WRITABLE_MASK if writable else 0) | (PT_USER_MASK if user else 0) | (PT64_NX_MASK if nx else 0)
    access = X86_GPT.gpte_access(gpte)
    assert bool(access & ACC_WRITE_MASK) == writable
    assert bool(access & ACC_USER_MASK) == user
    assert bool(access & ACC_EXEC_MASK) == (not nx)


@format_ids
@settings(max_examples=30)
@given(access=acc_bits, gfn=st.integers(0, (1 << 40) - 1))
def test_make_gpte_grants_exactly_the_requested_access(fmt: GptFormat, access: int, gfn: int) -> None:
    gpte = fmt.make_gpte(gfn, access)
    assert fmt.gpte_access(gpte) == access
    assert fmt.gpte_to_gfn_lvl(gpte, PG_LEVEL_4K) == gfn


def test_ept_gpte_without_rwx_is_not_present() -> None:
    assert not EPT_GPT.is_present_gpte(EPT_GPT.make_gpte(0x1234, 0))
    assert X86_GPT.is_present_gpte(X86_GPT.make_gpte(0x1234, 0))


@format_ids
@pytest.mark.parametrize("level", [PG_LEVEL_2M, PG_LEVEL_1G])
def test_huge_gpte_gfn_ignores_the_bits_below_the_page_size(fmt: GptFormat, level: int) -> None:
    """gpte_to_gfn_lvl() masks with PT_LVL_ADDR_MASK, dropping the PAT bit of a huge PTE."""
    gfn = 3 * KVM_PAGES_PER_HPAGE(level)
    gpte = fmt.make_gpte(gfn, ACC_ALL, level, large=True) | (1 << PAGE_SHIFT)
    assert fmt.gpte_to_gfn_lvl(gpte, level) == gfn


# --- guest_build_identity_map() and guest_walk() (FNAME(walk_addr_generic)). --------------


def _identity_mapped(fmt: GptFormat, page_level: int, gfn_start: int, npages: int, access: int = ACC_ALL) -> Kvm:
    kvm = Kvm.create("tdp")
    guest_build_identity_map(
        kvm,
        fmt,
        root_gfn=ROOT_GFN,
        table_gfns=TABLE_GFNS,
        gfn_start=gfn_start,
        npages=npages,
        page_level=page_level,
        access=access,
    )
    return kvm


@format_ids
@pytest.mark.parametrize("page_level", [PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G])
@settings(max_examples=20)
@given(data=st.data())
def test_identity_map_walks_to_gva_equals_gpa_at_the_page_level(
    fmt: GptFormat, page_level: int, data: st.DataObject
) -> None:
    span = KVM_PAGES_PER_HPAGE(page_level)
    gfn_start, npages = span, 4 * span
    kvm = _identity_mapped(fmt, page_level, gfn_start, npages)
    gfn = data.draw(st.integers(gfn_start, gfn_start + npages - 1))
    addr = (gfn << PAGE_SHIFT) | data.draw(st.integers(0, 0xFFF))
    walker = guest_walk(kvm, fmt, ROOT_GFN, addr)
    assert walker is not None
    assert walker.gfn == gfn
    assert walker.level == page_level
    assert walker.pte_access == ACC_ALL
    assert sorted(walker.table_gfn) == list(range(page_level, PT64_ROOT_4LEVEL + 1))


@format_ids
@pytest.mark.parametrize("page_level", [PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G])
def test_identity_map_allocates_tables_from_the_root_down_in_order(fmt: GptFormat, page_level: int) -> None:
    """The first mapping takes one table per level below the root, in the order given."""
    span = KVM_PAGES_PER_HPAGE(page_level)
    kvm = _identity_mapped(fmt, page_level, span, span)
    walker = guest_walk(kvm, fmt, ROOT_GFN, span << PAGE_SHIFT)
    assert walker is not None
    expected = {PT64_ROOT_4LEVEL: ROOT_GFN}
    for i, level in enumerate(range(PT64_ROOT_4LEVEL - 1, page_level - 1, -1)):
        expected[level] = TABLE_GFNS[i]
    assert walker.table_gfn == expected
    assert set(kvm.guest_tables) == set(expected.values())


@format_ids
def test_identity_map_shares_tables_between_neighbouring_pages(fmt: GptFormat) -> None:
    kvm = _identity_mapped(fmt, PG_LEVEL_4K, 0x200, 8)
    first = guest_walk(kvm, fmt, ROOT_GFN, 0x200 << PAGE_SHIFT)
    last = guest_walk(kvm, fmt, ROOT_GFN, 0x207 << PAGE_SHIFT)
    assert first is not None and last is not None
    assert first.table_gfn == last.table_gfn
    assert len(kvm.guest_tables) == 4


@format_ids
@pytest.mark.parametrize("access", [ACC_USER_MASK, ACC_USER_MASK | ACC_WRITE_MASK, ACC_USER_MASK | ACC_EXEC_MASK])
def test_walk_reports_the_leaf_access(fmt: GptFormat, access: int) -> None:
    """Upper levels grant ACC_ALL, so the walk's pte_access is the leaf's access."""
    kvm = _identity_mapped(fmt, PG_LEVEL_2M, 0x200, 0x200, access=access)
    walker = guest_walk(kvm, fmt, ROOT_GFN, 0x300 << PAGE_SHIFT)
    assert walker is not None
    assert walker.pte_access == access
    assert walker.pt_access[PG_LEVEL_2M] == ACC_ALL


@format_ids
def test_walk_of_an_unmapped_address_finds_nothing(fmt: GptFormat) -> None:
    kvm = _identity_mapped(fmt, PG_LEVEL_4K, 0x200, 8)
    assert guest_walk(kvm, fmt, ROOT_GFN, 0x208 << PAGE_SHIFT) is None
    assert guest_walk(kvm, fmt, ROOT_GFN, 1 << 39) is None
    assert guest_walk(kvm, fmt, ROOT_GFN + 1, 0x200 << PAGE_SHIFT) is None


@pytest.mark.parametrize("page_level", [0, 4])
def test_identity_map_at_a_bad_level_is_a_harness_error(page_level: int) -> None:
    with pytest.raises(HarnessError, match="page_level"):
        _identity_mapped(X86_GPT, page_level, 0, 512)


def test_identity_map_of_an_unaligned_range_is_a_harness_error() -> None:
    with pytest.raises(HarnessError, match="not aligned"):
        _identity_mapped(X86_GPT, PG_LEVEL_2M, 0x100, 0x200)


def test_identity_map_out_of_table_gfns_is_a_harness_error() -> None:
    kvm = Kvm.create("tdp")
    with pytest.raises(HarnessError, match="ran out"):
        guest_build_identity_map(
            kvm, X86_GPT, root_gfn=ROOT_GFN, table_gfns=[0x20], gfn_start=0, npages=1, page_level=PG_LEVEL_4K
        )
