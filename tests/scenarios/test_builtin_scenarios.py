"""Every built-in scenario holds its expected outcome with every invariant checked.

Each scenario cites the kernel function whose behaviour it pins (see
kvmsplit/scenarios.py); a failure here means the model disagrees with that
behaviour or breaks an invariant.
"""

import pytest

from kvmsplit.scenarios import SCENARIOS, get_scenario
from kvmsplit.trace import run_trace


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_meets_its_expectations(name: str) -> None:
    sc = get_scenario(name)
    result = run_trace(sc.config, sc.ops)
    assert result.ok, f"{name} ({sc.kernel}) failed at step {result.failed_step}: {result.failure}"
    # An expectation-free scenario would pin nothing.
    assert any(op.get("op") == "expect" or "expect" in op for op in sc.ops)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_v3_model_keeps_every_invariant_on_the_scenarios(name: str) -> None:
    sc = get_scenario(name)
    cfg = type(sc.config)(**(sc.config.to_dict() | {"model": "v3"}))
    result = run_trace(cfg, sc.ops)
    assert result.ok, f"v3 on {name} failed at step {result.failed_step}: {result.failure}"
