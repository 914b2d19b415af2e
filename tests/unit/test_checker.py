"""Unit tests for kvmsplit/checker.py (which invariants run, and when).

"state" and "return" invariants run after each operation, "unlock"
invariants at every `Kvm.mmu_unlock()` through the hook the checker installs.
"""

from __future__ import annotations

import pytest

from kvmsplit import mmu, tdp_mmu
from kvmsplit.checker import Checker
from kvmsplit.errors import HarnessError, InvariantViolation
from kvmsplit.kvm import Kvm
from tests.helpers import MiB, add_slot, new_vm


def mapped_vm() -> tuple[Kvm, Checker]:
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    mmu.kvm_vcpu_access(kvm, 0, 0, write=True)
    checker.after_operation()
    return kvm, checker


def test_checker_rejects_an_unknown_invariant_name() -> None:
    kvm = Kvm.create("tdp")
    with pytest.raises(HarnessError, match=r"unknown invariant\(s\) \['no_such_invariant'\]; known: \["):
        Checker(kvm, names=["page_stats_count_present_leaves", "no_such_invariant"])
    # A rejected checker leaves no hook behind.
    assert kvm.unlock_hooks == []


def test_checker_installs_one_unlock_hook() -> None:
    kvm = Kvm.create("tdp")
    checker = Checker(kvm)
    assert kvm.unlock_hooks == [checker._at_unlock]


def test_every_mmu_unlock_runs_the_unlock_checks_once() -> None:
    kvm, checker = new_vm("tdp")
    assert checker.unlock_checks == 0
    kvm.mmu_unlock("test")
    kvm.mmu_unlock("test")
    assert checker.unlock_checks == 2
    assert checker.step_checks == 0


def test_operations_reach_the_unlock_checks() -> None:
    kvm, checker = new_vm("tdp")
    add_slot(kvm, 0, 0, 4 * MiB, "thp")
    before = checker.unlock_checks
    mmu.kvm_vcpu_access(kvm, 0, 0, write=True)
    assert checker.unlock_checks > before


def test_after_operation_counts_step_checks() -> None:
    _, checker = mapped_vm()
    steps = checker.step_checks
    checker.after_operation()
    assert checker.step_checks == steps + 1


def test_an_unlock_invariant_fails_at_mmu_unlock() -> None:
    kvm, _ = mapped_vm()
    kvm.kvm_flush_remote_tlbs("test")
    tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, 0, 512, False)
    with pytest.raises(InvariantViolation) as excinfo:
        kvm.mmu_unlock("test zap without flush")
    assert excinfo.value.name == "flush_debt_paid_at_unlock"


def test_a_deferred_flush_is_not_owed_at_unlock_but_at_return() -> None:
    kvm, checker = mapped_vm()
    kvm.kvm_flush_remote_tlbs("test")
    tdp_mmu.kvm_tdp_mmu_wrprot_slot(kvm, kvm.slot(0), 1)
    kvm.mmu_unlock("dirty-log write-protect")
    with pytest.raises(InvariantViolation) as excinfo:
        checker.after_operation()
    assert excinfo.value.name == "flush_debt_paid_at_return"


def test_after_operation_does_not_run_unlock_invariants() -> None:
    kvm, checker = mapped_vm()
    checker.detach()
    kvm.kvm_flush_remote_tlbs("test")
    kvm.owe_flush("test")
    unlock_only = Checker(kvm, names=["flush_debt_paid_at_unlock"])
    unlock_only.after_operation()
    with pytest.raises(InvariantViolation) as excinfo:
        kvm.mmu_unlock("test")
    assert excinfo.value.name == "flush_debt_paid_at_unlock"


def test_a_named_checker_runs_only_its_invariants() -> None:
    kvm, checker = mapped_vm()
    checker.detach()
    kvm.kvm_flush_remote_tlbs("test")
    kvm.owe_flush("test")
    only_stats = Checker(kvm, names=["page_stats_count_present_leaves"])
    kvm.mmu_unlock("test")
    only_stats.after_operation()
    assert [inv.name for inv in only_stats.selected("unlock")] == []
    assert [inv.name for inv in only_stats.selected("state")] == ["page_stats_count_present_leaves"]
    kvm.stat.pages[0] += 1
    with pytest.raises(InvariantViolation, match="page_stats_count_present_leaves"):
        only_stats.after_operation()


def test_a_detached_checker_checks_nothing_at_unlock() -> None:
    kvm, checker = mapped_vm()
    count = checker.unlock_checks
    checker.detach()
    assert kvm.unlock_hooks == []
    kvm.owe_flush("test")
    kvm.mmu_unlock("test")
    assert checker.unlock_checks == count
    checker.detach()  # a second detach is harmless
