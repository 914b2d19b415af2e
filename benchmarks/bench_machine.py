"""Time the state machines and the mutant hunt under the ci profile's budget.

For each MMU configuration and faithful model: test cases per second and
operations (steps) per second with generation only.  For each mutant: the
time to the first failure (generation only), the time to a shrunk failure
(generation and shrinking), and the shrunk length in rule steps.

Usage: .venv/bin/python benchmarks/bench_machine.py
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import kvmsplit.machine as machine
from kvmsplit.models_registry import list_models, model_module

GENERATE = [Phase.generate]
SHRINK = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]


def ci(phases: list[Phase]) -> settings:
    return settings(
        max_examples=60,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )


def throughput(mmu: str, model: str) -> tuple[int, int, float]:
    counts = {"examples": 0, "ops": 0}
    base = machine.machine_for(mmu, model)

    class Counting(base):  # type: ignore[misc, valid-type]
        def teardown(self) -> None:
            counts["examples"] += 1
            counts["ops"] += len(self.ops)
            super().teardown()

    t = time.perf_counter()
    run_state_machine_as_test(Counting, settings=ci(GENERATE))
    return counts["examples"], counts["ops"], time.perf_counter() - t


def hunt(name: str, phases: list[Phase]) -> tuple[float, int | None, str]:
    t = time.perf_counter()
    try:
        run_state_machine_as_test(machine.machine_for("tdp", name), settings=ci(phases))
    except Exception as e:  # any finding counts; its name is reported
        notes = "\n".join(getattr(e, "__notes__", []))
        steps = [ln for ln in notes.splitlines() if ln.strip().startswith("state.") and "teardown" not in ln]
        return time.perf_counter() - t, len(steps), getattr(e, "name", type(e).__name__)
    return time.perf_counter() - t, None, "not caught"


def main() -> None:
    print("state machine throughput (ci profile, generation only)")
    print(f"{'mmu':<11} {'model':<7} {'cases':>6} {'ops':>6} {'time s':>7} {'cases/s':>8} {'ops/s':>7}")
    for mmu in ("tdp", "tdp-legacy", "shadow"):
        for model in ("merged", "v3"):
            n, ops, dt = throughput(mmu, model)
            print(f"{mmu:<11} {model:<7} {n:>6} {ops:>6} {dt:>7.2f} {n / dt:>8.1f} {ops / dt:>7.0f}")
    print()
    print("mutants on the tdp configuration (ci profile)")
    print(f"{'mutant':<42} {'first failure s':>15} {'shrunk s':>9} {'steps':>5} {'stated':>6}  invariant")
    for name in [m for m in list_models() if m.startswith("mutants/")]:
        first, _, _ = hunt(name, GENERATE)
        shrunk, steps, inv = hunt(name, SHRINK)
        stated = model_module(name).SHORTEST_TRACE
        shown = "-" if steps is None else str(steps)
        print(f"{name:<42} {first:>15.2f} {shrunk:>9.2f} {shown:>5} {stated:>6}  {inv}")


if __name__ == "__main__":
    main()
