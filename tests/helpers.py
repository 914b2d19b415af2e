"""Builders shared by the scenario tests: VMs, slots and L1 EPT tables for L2."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kvmsplit import mmu, x86
from kvmsplit.checker import Checker
from kvmsplit.guest import EPT_GPT
from kvmsplit.kvm import Kvm, KvmConfig
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmsplit.spte import ACC_ALL, PG_LEVEL_2M, PG_LEVEL_4K

MiB = 1 << 20
GiB = 1 << 30
HVA = 0x7F00_0000_0000
PT_SLOT = 9
PT_GFN = 0x10_0000  # page tables live at 4 GiB, in their own 4k-backed slot


def new_vm(mmu_kind: str = "tdp", nr_vcpus: int = 1, **params: bool) -> tuple[Kvm, Checker]:
    kvm = Kvm.create(KvmConfig.named(mmu_kind), nr_vcpus=nr_vcpus)
    for k, v in params.items():
        setattr(kvm, k, v)
    return kvm, Checker(kvm)


def add_slot(kvm: Kvm, slot: int, gpa: int, size: int, backing: str = "thp", flags: int = 0) -> None:
    x86.kvm_set_user_memory_region(kvm, slot, flags, gpa, size, HVA + gpa, backing)


def set_logging(kvm: Kvm, slot: int, on: bool) -> None:
    s = kvm.slot(slot)
    x86.kvm_set_user_memory_region(
        kvm, slot, KVM_MEM_LOG_DIRTY_PAGES if on else 0, s.base_gfn << 12, s.npages << 12, s.userspace_addr
    )


class EptBuilder:
    """L1 writes EPT tables for L2 straight into guest memory (before L2 runs)."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        add_slot(kvm, PT_SLOT, PT_GFN << 12, 4 * MiB, "4k")
        self.next_gfn = PT_GFN + 1
        self.root = PT_GFN
        kvm.guest_tables[self.root] = [0] * 512

    def _table(self, table: int, index: int) -> int:
        gptes = self.kvm.guest_tables[table]
        if EPT_GPT.is_present_gpte(gptes[index]):
            return EPT_GPT.gpte_to_gfn_lvl(gptes[index], PG_LEVEL_4K)
        new = self.next_gfn
        self.next_gfn += 1
        self.kvm.guest_tables[new] = [0] * 512
        gptes[index] = EPT_GPT.make_gpte(new, ACC_ALL)
        return new

    def map(self, l2_gpa: int, l1_gfn: int, level: int, access: int = ACC_ALL) -> None:
        """Map one guest page of @level at L2 gpa @l2_gpa to L1 gfn @l1_gfn."""
        table = self.root
        for lvl in range(4, level, -1):
            table = self._table(table, (l2_gpa >> (12 + 9 * (lvl - 1))) & 511)
        index = (l2_gpa >> (12 + 9 * (level - 1))) & 511
        self.kvm.guest_tables[table][index] = EPT_GPT.make_gpte(l1_gfn, access, level, large=level > 1)

    def map_range(self, l2_gpa: int, l1_gfn: int, size: int, level: int = PG_LEVEL_2M) -> None:
        step = 1 << (12 + 9 * (level - 1))
        for off in range(0, size, step):
            self.map(l2_gpa + off, l1_gfn + (off >> 12), level)


def run(kvm: Kvm, checker: Checker, vcpu: int, start: int, end: int, stride: int, access: str = "read") -> None:
    for addr in range(start, end, stride):
        mmu.kvm_vcpu_access(kvm, vcpu, addr, write=access == "write", exec=access == "exec")
    checker.after_operation()


def on_a_fresh_stack(fn: Callable[[], Any]) -> Any:
    """Call @fn in a new thread, whose stack starts empty, and return or raise what it does.

    Hypothesis runs a failing example hundreds of times while it shrinks,
    and each failure costs more the deeper the stack it is raised in: the
    hunt for mutants/split_levels_ascending took 9.8 s called from a pytest
    test, 5.1 s from a fresh thread, and in a plain script 6.2 s at depth 0,
    8.3 s at depth 80 and 10.5 s at depth 200 (CPython 3.11).  A pytest
    test runs some 60 frames deep.
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=run, name="kvmsplit-hunt")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")
