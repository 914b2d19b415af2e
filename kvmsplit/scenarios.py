"""Built-in scenarios: short traces that pin kernel behaviour, each with its expected outcome.

Like a TLA+ model recording the result it expects, every scenario carries
its expectations as `expect` operations (page stats) and `expect` fields on
KVM_GET_DIRTY_LOG (the reported gfns).  `kvmsplit scenario NAME` runs one;
tests/scenarios/ runs them all and cites the kernel function each pins.

The dirty_log_page_splitting_* scenarios reproduce the kernel selftest
tools/testing/selftests/kvm/x86/dirty_log_page_splitting_test.c on the TDP
MMU and on a nested guest's shadow MMU, with and without initially-set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from kvmsplit.errors import HarnessError
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmsplit.trace import TraceConfig

MiB = 1 << 20
GiB = 1 << 30
HVA_BASE = 0x7F00_0000_0000
# Guest page tables live in their own small slot far above guest memory.
PT_SLOT = 9
PT_GPA = 0x10_0000_0000
PT_GFN = PT_GPA >> 12

Ops = list[dict[str, Any]]


@attrs.frozen
class Scenario:
    name: str
    doc: str
    kernel: str
    config: TraceConfig
    ops: Ops


SCENARIOS: dict[str, Callable[[], Scenario]] = {}


def scenario(func: Callable[[], Scenario]) -> Callable[[], Scenario]:
    SCENARIOS[func.__name__] = func
    return func


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise HarnessError(f"no scenario named {name!r}; `kvmsplit scenarios` lists them")
    return SCENARIOS[name]()


def slot_op(
    slot: int, gpa: int, size: int, backing: str | None = "thp", flags: int = 0, hva: int | None = None
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": "kvm_set_user_memory_region",
        "slot": slot,
        "flags": flags,
        "gpa": gpa,
        "size": size,
        "hva": HVA_BASE + gpa if hva is None else hva,
    }
    if backing is not None:
        op["backing"] = backing
    return op


def access_ops(start: int, end: int, stride: int, access: str = "read", vcpu: int = 0) -> Ops:
    """One guest pass (a KVM_RUN of the mailbox loop) over [start, end)."""
    return [{"op": "kvm_vcpu_run", "vcpu": vcpu, "start": start, "end": end, "stride": stride, "access": access}]


def identity_map_op(
    fmt: str, root_gfn: int, table_gfns: list[int], gfn_start: int, npages: int, page_level: int
) -> dict[str, Any]:
    """The guest lays out page tables mapping [gfn_start, +npages) at addr == gpa."""
    return {
        "op": "guest_build_identity_map",
        "format": fmt,
        "root_gfn": root_gfn,
        "table_gfns": table_gfns,
        "gfn_start": gfn_start,
        "npages": npages,
        "page_level": page_level,
    }


def expect(**stats: int) -> dict[str, Any]:
    return {"op": "expect", **stats}


def ept_tables(npages_guest: int, page_level: int) -> Ops:
    """L1 lays out EPT tables for L2 in the page-table slot (identity map)."""
    n_tables = 3 + max(1, npages_guest // (512 * 512)) * (1 if page_level >= 2 else 512)
    return [
        slot_op(PT_SLOT, PT_GPA, 4 * MiB, backing="4k"),
        identity_map_op("ept", PT_GFN, list(range(PT_GFN + 1, PT_GFN + 1 + n_tables)), 0, npages_guest, page_level),
    ]


# --- reference MMU core ------------------------------------------------------------


@scenario
def shadow_paging_thp_2m_guest() -> Scenario:
    """Shadow paging of a guest with 2 MiB pages on THP: one 2M SPTE per frame,
    except the frame holding the guest's own page tables, which stays 4K."""
    size = 16 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp")]
    ops.append(identity_map_op("x86", 0x10, [0x11, 0x12], 0, size >> 12, 2))
    ops.append({"op": "kvm_set_cr3", "vcpu": 0, "root_gfn": 0x10})
    ops += access_ops(0, size, 4096)
    # Frame 0 holds the tables: write-tracked and disallowed huge (account_shadowed()).
    ops.append(expect(pages_2m=7, pages_4k=512, n_used_mmu_pages=4))
    return Scenario(
        "shadow_paging_thp_2m_guest",
        shadow_paging_thp_2m_guest.__doc__ or "",
        "FNAME(fetch), account_shadowed(), kvm_mmu_max_mapping_level()",
        TraceConfig(mmu="shadow"),
        ops,
    )


@scenario
def dirty_log_lazy_split() -> Scenario:
    """Without eager splitting, a write after enabling dirty logging splits only
    the touched 2M frame, lazily, with one remote TLB flush (link_shadow_page())."""
    size = 8 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp")]
    ops += access_ops(0, size, 2 * MiB)
    ops.append(expect(pages_2m=4, pages_4k=0, remote_tlb_flush_requests=0))
    ops.append(slot_op(0, 0, size, None, KVM_MEM_LOG_DIRTY_PAGES))
    # Enabling write-protects the slot and flushes once (kvm_mmu_slot_apply_flags()).
    ops.append(expect(pages_2m=4, pages_4k=0, remote_tlb_flush_requests=1))
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": 2 * MiB + 0x5000, "access": "write"})
    # The huge SPTE is dropped with a flush; only the written 4K page is mapped
    # (no prefetch for a write into a dirty-logged slot).
    ops.append(expect(pages_2m=3, pages_4k=1, remote_tlb_flush_requests=2))
    ops.append({"op": "kvm_get_dirty_log", "slot": 0, "expect": [(2 * MiB + 0x5000) >> 12]})
    return Scenario(
        "dirty_log_lazy_split",
        dirty_log_lazy_split.__doc__ or "",
        "kvm_mmu_slot_apply_flags(), direct_map(), __link_shadow_page(flush=true)",
        TraceConfig(mmu="tdp-legacy", eager_page_split=False),
        ops,
    )


@scenario
def get_dirty_log_exact() -> Scenario:
    """KVM_GET_DIRTY_LOG reports exactly the gfns written since logging started,
    and a second call reports only what was written in between."""
    size = 4 * MiB
    written = [0x3, 0x4, 0x200, 0x3FF]
    ops: Ops = [slot_op(0, 0, size, "thp")]
    ops += access_ops(0, size, 2 * MiB, "write")
    ops.append(slot_op(0, 0, size, None, KVM_MEM_LOG_DIRTY_PAGES))
    ops += [{"op": "kvm_vcpu_access", "vcpu": 0, "addr": g << 12, "access": "write"} for g in written]
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": 0x100 << 12, "access": "read"})
    ops.append({"op": "kvm_get_dirty_log", "slot": 0, "expect": written})
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": 0x4 << 12, "access": "write"})
    ops.append({"op": "kvm_get_dirty_log", "slot": 0, "expect": [0x4]})
    return Scenario(
        "get_dirty_log_exact",
        get_dirty_log_exact.__doc__ or "",
        "kvm_get_dirty_log_protect(), fast_page_fault(), mark_page_dirty_in_slot()",
        TraceConfig(mmu="tdp", eager_page_split=True),
        ops,
    )


@scenario
def unaligned_slot_edges_map_4k() -> Scenario:
    """A slot whose ends are not 2 MiB aligned maps its partial edge frames with
    4K pages and the aligned middle with 2M pages (kvm_alloc_memslot_metadata())."""
    gpa = 2 * MiB - 64 * 1024
    size = 4 * MiB + 128 * 1024
    ops: Ops = [slot_op(0, gpa, size, "thp", hva=HVA_BASE + 2 * MiB - 64 * 1024)]
    ops += access_ops(gpa, gpa + size, 4096)
    # 16 pages below 2M, two whole frames, 16 pages above 6M.
    ops.append(expect(pages_2m=2, pages_4k=32))
    return Scenario(
        "unaligned_slot_edges_map_4k",
        unaligned_slot_edges_map_4k.__doc__ or "",
        "kvm_alloc_memslot_metadata(), __kvm_mmu_max_mapping_level()",
        TraceConfig(mmu="tdp"),
        ops,
    )


@scenario
def hva_incongruent_maps_4k() -> Scenario:
    """When gfn and hva disagree modulo 2 MiB, the whole slot maps 4K even on THP."""
    size = 4 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp", hva=HVA_BASE + 4096)]
    ops += access_ops(0, size, 64 * 1024)
    ops.append(expect(pages_2m=0))
    return Scenario(
        "hva_incongruent_maps_4k",
        hva_incongruent_maps_4k.__doc__ or "",
        "kvm_alloc_memslot_metadata() (ugfn check)",
        TraceConfig(mmu="tdp"),
        ops,
    )


@scenario
def disable_dirty_log_recovers_huge() -> Scenario:
    """Disabling dirty logging zaps collapsible 4K SPTEs, and the next faults map 2M again."""
    size = 8 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp")]
    ops += access_ops(0, size, 2 * MiB)
    ops.append(slot_op(0, 0, size, None, KVM_MEM_LOG_DIRTY_PAGES))
    ops += access_ops(0, size, 64 * 1024, "write")
    ops.append(expect(pages_2m=0))
    ops.append(slot_op(0, 0, size, None, 0))
    ops += access_ops(0, size, 2 * MiB)
    ops.append(expect(pages_2m=4, pages_4k=0))
    return Scenario(
        "disable_dirty_log_recovers_huge",
        disable_dirty_log_recovers_huge.__doc__ or "",
        "kvm_mmu_zap_collapsible_sptes()",
        TraceConfig(mmu="tdp-legacy", eager_page_split=False),
        ops,
    )


# --- eager page splitting: the kernel selftest -----------------------------------------


def _selftest(mmu_kind: str, initially_set: bool, nested: bool) -> Scenario:
    """dirty_log_page_splitting_test.c: populate, enable logging, dirty twice, disable, repopulate."""
    slot_size = 8 * MiB
    nr_slots = 2
    guest_pages = nr_slots * slot_size >> 12
    ops: Ops = []
    if initially_set:
        ops.append({"op": "kvm_enable_cap_manual_dirty_log_protect", "flags": 3})
    for s in range(nr_slots):
        ops.append(slot_op(s, s * slot_size, slot_size, "thp"))
    if nested:
        ops += ept_tables(guest_pages, 2)
        for v in range(2):
            ops.append({"op": "nested_vmx_enter", "vcpu": v, "eptp_gfn": PT_GFN})
    # Each of the two vCPUs writes its half of guest memory.
    half = nr_slots * slot_size // 2
    for v in range(2):
        ops += access_ops(v * half, (v + 1) * half, 4096 * 64, "write", vcpu=v)
    huge = guest_pages // 512
    ops.append(expect(pages_2m=huge, pages_1g=0))
    for s in range(nr_slots):
        ops.append(slot_op(s, s * slot_size, slot_size, None, KVM_MEM_LOG_DIRTY_PAGES))
    if initially_set:
        ops.append(expect(pages_2m=huge))
    else:
        ops.append(expect(pages_2m=0, pages_1g=0, pages_4k=guest_pages))
    for iteration in range(2):
        for v in range(2):
            ops += access_ops(v * half, (v + 1) * half, 4096, "write", vcpu=v)
        for s in range(nr_slots):
            all_gfns = list(range(s * slot_size >> 12, (s + 1) * slot_size >> 12))
            ops.append({"op": "kvm_get_dirty_log", "slot": s, "expect": all_gfns})
            if initially_set:
                ops.append(
                    {
                        "op": "kvm_clear_dirty_log",
                        "slot": s,
                        "first_page": 0,
                        "num_pages": slot_size >> 12,
                        "gfns": all_gfns,
                    }
                )
        if initially_set and iteration == 0:
            ops.append(expect(pages_2m=0, pages_1g=0, pages_4k=guest_pages))
    for s in range(nr_slots):
        ops.append(slot_op(s, s * slot_size, slot_size, None, 0))
    for v in range(2):
        ops += access_ops(v * half, (v + 1) * half, 4096 * 64, "write", vcpu=v)
    ops.append(expect(pages_2m=huge, pages_1g=0))
    name = f"dirty_log_page_splitting_{'nested' if nested else 'tdp'}{'_initially_set' if initially_set else ''}"
    where = "shadow MMU (nested L2)" if nested else "TDP MMU"
    return Scenario(
        name,
        f"The kernel selftest dirty_log_page_splitting_test on the {where}"
        + (
            ", manual protect with initially-set: splitting waits for the first KVM_CLEAR_DIRTY_LOG."
            if initially_set
            else ": logging splits everything at enable time."
        ),
        "kvm_mmu_slot_apply_flags(), kvm_mmu_slot_try_split_huge_pages(), kvm_arch_mmu_enable_log_dirty_pt_masked()",
        TraceConfig(mmu=mmu_kind, nr_vcpus=2),
        ops,
    )


@scenario
def dirty_log_page_splitting_tdp() -> Scenario:
    return _selftest("tdp", False, False)


@scenario
def dirty_log_page_splitting_tdp_initially_set() -> Scenario:
    return _selftest("tdp", True, False)


@scenario
def dirty_log_page_splitting_nested() -> Scenario:
    return _selftest("tdp", False, True)


@scenario
def dirty_log_page_splitting_nested_initially_set() -> Scenario:
    return _selftest("tdp", True, True)


# --- where the merged code and the v3 patch differ ------------------------------------


@scenario
def eager_split_without_tdp_mmu() -> Scenario:
    """tdp_mmu=N: the merged code never splits eagerly (huge pages are write-protected
    and split lazily); the v3 patch split every huge page at enable time."""
    size = 8 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp")]
    ops += access_ops(0, size, 2 * MiB)
    ops.append(slot_op(0, 0, size, None, KVM_MEM_LOG_DIRTY_PAGES))
    ops += access_ops(0, size, 2 * MiB, "write")
    ops.append({"op": "kvm_get_dirty_log", "slot": 0, "expect": [g for g in range(0, size >> 12, 512)]})
    return Scenario(
        "eager_split_without_tdp_mmu",
        eager_split_without_tdp_mmu.__doc__ or "",
        "kvm_mmu_slot_try_split_huge_pages() (tdp_mmu_enabled gate)",
        TraceConfig(mmu="tdp-legacy", eager_page_split=True),
        ops,
    )


@scenario
def eager_split_shadow_paging() -> Scenario:
    """ept=N (shadow paging): the merged code splits nothing; the v3 patch split the
    huge SPTEs that shadow the guest's 2M pages into direct pages."""
    size = 8 * MiB
    ops: Ops = [slot_op(0, 0, size, "thp"), slot_op(PT_SLOT, PT_GPA, 4 * MiB, "4k")]
    ops.append(identity_map_op("x86", PT_GFN, [PT_GFN + 1, PT_GFN + 2, PT_GFN + 3], 0, size >> 12, 2))
    ops.append({"op": "kvm_set_cr3", "vcpu": 0, "root_gfn": PT_GFN})
    ops += access_ops(0, size, 2 * MiB)
    ops.append(slot_op(0, 0, size, None, KVM_MEM_LOG_DIRTY_PAGES))
    ops += access_ops(0, size, 2 * MiB, "write")
    ops.append({"op": "kvm_get_dirty_log", "slot": 0, "expect": [g for g in range(0, size >> 12, 512)]})
    return Scenario(
        "eager_split_shadow_paging",
        eager_split_shadow_paging.__doc__ or "",
        "kvm_mmu_slot_try_split_huge_pages(), FNAME(fetch)",
        TraceConfig(mmu="shadow", eager_page_split=True),
        ops,
    )


@scenario
def split_zaps_unsync_page_at_child_gfn() -> Scenario:
    """Splitting a nested 1G page looks up a 2M-level child at the 1G page's first gfn;
    the merged code's __kvm_mmu_get_shadow_page() zaps an unsync 4K page shadowing
    a guest table there (and flushes), the v3 patch's own lookup leaves it."""
    big = 1 << 30
    table = big >> 12  # L1 keeps an EPT table at the first gfn of the 1G page
    ops: Ops = [{"op": "kvm_enable_cap_manual_dirty_log_protect", "flags": 3}]
    ops.append(slot_op(0, big, big, "hugetlb-1g"))
    ops.append(slot_op(1, 0, 2 * MiB, "4k"))
    ops.append(slot_op(PT_SLOT, PT_GPA, 4 * MiB, "4k"))
    ops.append(identity_map_op("ept", PT_GFN, [PT_GFN + 1, PT_GFN + 2, table], 0, 512, 1))
    ops.append(identity_map_op("ept", PT_GFN, [], table, 512 * 512, 3))
    ops.append({"op": "nested_vmx_enter", "vcpu": 0, "eptp_gfn": PT_GFN})
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": big, "access": "read"})
    ops.append(expect(pages_1g=1))
    # L2 touches memory mapped through the table at `table`: it gets shadowed (4K level).
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": 0x1000, "access": "read"})
    ops.append({"op": "nested_vmx_vmexit", "vcpu": 0})
    # L1 edits that table: the 4K shadow page goes unsync (mmu_try_to_unsync_pages()).
    ops.append({"op": "kvm_vcpu_access", "vcpu": 0, "addr": big + 8 * 8, "access": "write", "pte": [8, 0]})
    ops.append(expect(mmu_unsync=1))
    ops.append(slot_op(0, big, big, None, KVM_MEM_LOG_DIRTY_PAGES))
    ops.append({"op": "kvm_clear_dirty_log", "slot": 0, "first_page": 64, "num_pages": 64, "gfns": [table + 64]})
    ops.append(expect(pages_1g=0))
    return Scenario(
        "split_zaps_unsync_page_at_child_gfn",
        split_zaps_unsync_page_at_child_gfn.__doc__ or "",
        "kvm_mmu_find_shadow_page(), shadow_mmu_get_sp_for_split()",
        TraceConfig(mmu="tdp"),
        ops,
    )


DEFAULT_SCENARIO = "dirty_log_page_splitting_nested"
