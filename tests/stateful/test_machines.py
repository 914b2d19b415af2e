"""Run the state machine on every MMU configuration and both faithful models.

Every invariant runs after each step and at each mmu_lock release; a
failure is shrunk and printed as the sequence of KVM entry points.
"""

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmsplit.machine import machine_for

CASES = [(mmu, model) for mmu in ("tdp", "tdp-legacy", "shadow") for model in ("merged", "v3")]


@pytest.mark.parametrize(("mmu", "model"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_invariants_hold_on_random_kvm_operations(mmu: str, model: str) -> None:
    run_state_machine_as_test(machine_for(mmu, model))
