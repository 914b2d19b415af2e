"""The model against the kernel's observations recorded on a PVM host (shadow paging, tdp_mmu=N).

Runs without /dev/kvm: tests/realkvm/data/kernel-pvm-shadow.json holds what
`kvmsplit conform --record` measured on such a host, with the module
parameters it read; the model is configured from those, not from this host.
Re-record after changing a scenario (its fingerprint changes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmsplit.realkvm.conform import load_kernel_record, run_model, scenario_fingerprint
from kvmsplit.realkvm.scenarios import SCENARIOS

RECORD = Path(__file__).parent / "data" / "kernel-pvm-shadow.json"
DOC = json.loads(RECORD.read_text())
CONFIG, KERNEL = load_kernel_record(DOC)


def test_recording_was_made_on_a_shadow_paging_host() -> None:
    assert CONFIG.mmu == "shadow" and not CONFIG.tdp_mmu and not CONFIG.mmio_caching
    assert DOC["kvm_params"]["tdp_mmu"] == "N"


def test_recording_covers_every_scenario() -> None:
    missing = sorted(set(SCENARIOS) - set(KERNEL))
    assert not missing, f"re-record with `kvmsplit conform --record {RECORD.name}`: {missing} not recorded"


@pytest.mark.parametrize("name", sorted(KERNEL))
def test_model_predicts_the_recorded_kernel(name: str, request: Any) -> None:
    if name not in SCENARIOS:
        pytest.skip(f"scenario {name} no longer exists")
    scenario = SCENARIOS[name]()
    if DOC["scenarios"][name]["fingerprint"] != scenario_fingerprint(scenario):
        pytest.fail(f"scenario {name} changed since it was recorded; re-record on a KVM host")
    model = run_model(scenario, CONFIG)
    kernel = KERNEL[name]
    diffs = {key: (kernel[key], model.get(key)) for key in kernel if model.get(key) != kernel[key]}
    assert not diffs, f"(checkpoint, quantity): (kernel, model) = {diffs}"


def test_known_disagreements_are_still_in_the_recording() -> None:
    """Pin the kernel's side of each disagreement, so a model fix is checked against it."""
    assert KERNEL["dontneed_under_guest_4k_ptes"][("dontneed", "pages_4k")] == 518
    assert KERNEL["dontneed_under_guest_4k_ptes"][("dontneed", "remote_tlb_flush_requests")] == 2
    assert KERNEL["guest_pd_store_byte"][("pd_store", "mmu_pde_zapped")] == 0
    assert KERNEL["guest_pd_store_byte"][("pd_store", "mmu_pte_write")] == 1
