"""The conformance oracle on this machine's /dev/kvm; every test skips, naming why, without it.

The whole module runs in a few seconds: each scenario is a handful of
KVM_RUNs of the mailbox guest, each bounded by a timer.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from kvmsplit.realkvm import guest as g
from kvmsplit.realkvm import ioctls as k
from kvmsplit.realkvm.conform import ModelConfig, RealSide, run_scenario
from kvmsplit.realkvm.scenarios import SCENARIOS, ConformScenario, Run, Slot
from kvmsplit.realkvm.vm import GuestError

MiB = 1 << 20


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_model_agrees_with_the_kernel(name: str, real_kvm: Any, request: Any) -> None:
    system, cpuid = real_kvm
    result = run_scenario(SCENARIOS[name](), system, cpuid, ModelConfig.from_host())
    assert result.error is None, result.error
    if result.unmet:
        pytest.skip(f"precondition unmet on this host: {result.unmet}")
    bad = [(r.checkpoint, r.quantity, r.kernel, r.model) for r in result.rows if r.verdict == "DISAGREE"]
    assert not bad, f"(checkpoint, quantity, kernel, model): {bad}"


def test_partial_dontneed_of_a_thp_invalidates_the_whole_frame(real_kvm: Any) -> None:
    """Kernel pin: MADV_DONTNEED of 64 KiB inside a THP zaps all 512 SPTEs of the frame, in two flushes."""
    system, cpuid = real_kvm
    result = run_scenario(SCENARIOS["dontneed_under_guest_4k_ptes"](), system, cpuid, ModelConfig.from_host())
    if result.unmet:
        pytest.skip(f"precondition unmet on this host: {result.unmet}")
    kernel = {(r.checkpoint, r.quantity): r.kernel for r in result.rows}
    assert kernel[("mapped", "pages_4k")] - kernel[("dontneed", "pages_4k")] == 512
    assert kernel[("dontneed", "remote_tlb_flush_requests")] - kernel[("mapped", "remote_tlb_flush_requests")] == 2


def test_one_byte_store_to_a_guest_pd_is_not_a_pde_zap(real_kvm: Any) -> None:
    """Kernel pin: a 1-byte emulated store into a level-2 table counts mmu_pte_write, not mmu_pde_zapped."""
    system, cpuid = real_kvm
    result = run_scenario(SCENARIOS["guest_pd_store_byte"](), system, cpuid, ModelConfig.from_host())
    kernel = {(r.checkpoint, r.quantity): r.kernel for r in result.rows}
    assert kernel[("pd_store", "mmu_pte_write")] == 1
    assert kernel[("pd_store", "mmu_pde_zapped")] == 0


def _empty(name: str = "t", steps: tuple[Any, ...] = ()) -> ConformScenario:
    return ConformScenario(name=name, doc="", kernel="", steps=steps)


def test_a_guest_that_never_exits_is_stopped_by_the_timer(real_kvm: Any) -> None:
    system, cpuid = real_kvm
    handler = signal.getsignal(signal.SIGALRM)
    with RealSide(_empty(), system, cpuid) as real:
        assert real.sysmem is not None
        # Stride 0: the read loop never reaches hi, so the pass never ends.
        real.sysmem.write(g.MAILBOX_GPA, g.mailbox(g.CODE_GPA, g.CODE_GPA + 64, 0, g.MAILBOX_OP_READ))
        start = time.monotonic()
        reason = real.vcpus[0].kvm_run(timeout=0.2)
        elapsed = time.monotonic() - start
    assert reason == k.KVM_EXIT_INTR
    assert 0.15 < elapsed < 2.0
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_a_guest_fault_is_reported_not_compared(real_kvm: Any) -> None:
    """A write beyond the 1 GiB identity map is a #PF with no IDT: a triple fault (KVM_EXIT_SHUTDOWN)."""
    system, cpuid = real_kvm
    with RealSide(_empty(), system, cpuid) as real, pytest.raises(GuestError, match="SHUTDOWN"):
        real.run(Run(g.IDENTITY_MAP_SIZE, g.IDENTITY_MAP_SIZE + 1))


def _count_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_scenarios_release_every_fd_and_mapping(real_kvm: Any) -> None:
    system, cpuid = real_kvm
    scenario = SCENARIOS["two_slots_delete_one"]()
    fds = len(os.listdir("/proc/self/fd"))
    maps = _count_maps()
    run_scenario(scenario, system, cpuid, ModelConfig.from_host(), check_invariants=False)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _count_maps() == maps


def test_resources_are_released_when_a_step_fails(real_kvm: Any) -> None:
    system, cpuid = real_kvm
    fds = len(os.listdir("/proc/self/fd"))
    bad = _empty("bad", steps=(Slot(1, 64 * MiB, 4 * MiB), Run(g.IDENTITY_MAP_SIZE, g.IDENTITY_MAP_SIZE + 1)))
    result = run_scenario(bad, system, cpuid, ModelConfig.from_host())
    assert result.error is not None and "SHUTDOWN" in result.error
    assert result.status == "error"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_model_configuration_is_read_from_the_running_kernel(real_kvm: Any) -> None:
    from kvmsplit.realkvm.vm import read_kvm_params

    config = ModelConfig.from_host()
    params = read_kvm_params()
    assert config.tdp_mmu == (params["tdp_mmu"] == "Y")
    assert config.eager_page_split == (params["eager_page_split"] == "Y")
    assert config.mmio_caching == (params.get("mmio_caching", "Y") == "Y")
