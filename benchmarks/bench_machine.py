"""Time the state machines and the mutant hunt under the ci profile's budget.

For each MMU configuration and faithful model: test cases per second and
operations (steps) per second with generation only, beside a plain random
walk over the same rules.  For each mutant, on the configuration its
module's HUNT names (the one tests/quality runs): the time to the first
failure (generation only) and to a shrunk failure (generation and
shrinking), and the shrunk length in steps, with the mutant's own
invariants checked as in tests/quality; the time to the first failure with
every invariant checked; and a plain random walk's time and length to its
first failure, with no shrinking.

Usage: .venv/bin/python benchmarks/bench_machine.py [--mutants NAME,...]
"""

from __future__ import annotations

import argparse
import random
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from kvmsplit.properties import invariants as _registers  # noqa: F401
from kvmsplit.properties.registry import by_mutant

import kvmsplit.machine as machine
from kvmsplit.models_registry import list_models, model_module
from kvmsplit.profiles import profile_settings

GENERATE = [Phase.generate]
SHRINK = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]


def ci(phases: list[Phase]) -> settings:
    """The ci profile, as tests/quality runs it, with only @phases."""
    return settings(
        profile_settings("ci"), phases=phases, report_multiple_bugs=False, suppress_health_check=list(HealthCheck)
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


def hunt(
    name: str,
    phases: list[Phase],
    mmu: str = "tdp",
    invariants: tuple[str, ...] | None = None,
    focus: str | None = None,
) -> tuple[float, int | None, str]:
    t = time.perf_counter()
    try:
        run_state_machine_as_test(machine.machine_for(mmu, name, invariants, focus=focus), settings=ci(phases))
    except Exception as e:  # any finding counts; its name is reported
        notes = "\n".join(getattr(e, "__notes__", []))
        steps = [ln for ln in notes.splitlines() if ln.strip().startswith("state.") and "teardown" not in ln]
        return time.perf_counter() - t, len(steps), getattr(e, "name", type(e).__name__)
    return time.perf_counter() - t, None, "not caught"


class RandomData:
    """Stands in for st.data() in a plain random walk: draws an address like the machine's strategy."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def draw(self, strategy: object, label: str | None = None) -> int:
        rng = self.rng
        pick = rng.randrange(3)
        if pick == 0:
            return rng.randrange(machine.GUEST_SPAN)
        if pick == 1:
            return machine.BIG_GPA + rng.randrange(4 << 20)
        return rng.choice([0, 0x1000, 2 << 20, (2 << 20) + 0x5000, (6 << 20) - 4096, 16 << 20, (20 << 20) - 4096])


def random_rules(state: machine.KvmMachine, rng: random.Random) -> None:
    """One step of the same rules, with arguments from @rng instead of Hypothesis."""
    m = state
    choices = [
        lambda: m.kvm_mmu_slot_apply_flags(),
        lambda: m.kvm_mmu_slot_apply_flags_stop(rng.choice([0, 1, 2])),
        lambda: m.kvm_mmu_slot_apply_flags_start(rng.choice([1, 2])),
        lambda: m.kvm_set_memory_region(rng.choice(["delete", "create", "move"])),
        lambda: m.kvm_vcpu_access(RandomData(rng), rng.randrange(2), rng.choice(["read", "write", "write", "exec"])),
        lambda: m.kvm_vcpu_run(rng.randrange(2), rng.randrange(12), rng.choice(["read", "write"])),
        lambda: m.guest_write_pde(
            rng.randrange(2),
            rng.randrange(12),
            rng.randrange(12),
            rng.choice([7, 7, 5, 3, 1, 4]),
            rng.choice(["huge", "huge", "table", "none"]),
        ),
        lambda: m.guest_write_pte(rng.randrange(2), rng.randrange(8), rng.choice([7, 5, 0])),
        lambda: m.kvm_guest_tlb_flush(rng.randrange(2)),
        lambda: m.kvm_get_dirty_log(rng.choice([0, 1, 2])),
        lambda: m.kvm_clear_dirty_log(
            rng.choice([0, 0, 1, 2]), rng.randrange(16), [rng.randrange(64) for _ in range(rng.randint(1, 4))]
        ),
        lambda: m.kvm_mmu_notifier(rng.randrange(4), rng.choice(["split", "collapse", "dontneed", "clear_young"])),
        lambda: m.kvm_mmu_change_mmu_pages(rng.choice([4, 5, 6, 7, 40])),
        lambda: m.set_module_param(rng.choice(["eager_page_split", "nx_huge_pages"]), rng.random() < 0.5),
        lambda: m.model_split_env(rng.randrange(4), rng.randrange(2), rng.randrange(2)),
    ]
    if m.nested:
        choices += [lambda: m.nested_vmx_enter(rng.randrange(2)), lambda: m.nested_vmx_vmexit(rng.randrange(2))]
    if m.mmu_kind == "tdp":
        choices.append(lambda: m.model_tdp_race(rng.choice(["accessed", "zap"])))
    if not m.initially_set:
        choices = [c for i, c in enumerate(choices) if i != 10]
    rng.choice(choices)()


def random_walk(
    mmu: str,
    model: str,
    cases: int = 60,
    steps: int = 40,
    seed: int = 0,
    invariants: tuple[str, ...] | None = None,
    focus: str | None = None,
) -> tuple[int, int, float, str | None, int]:
    """(cases, ops, seconds, finding, failing length) of a plain walk that stops at the first finding."""
    rng = random.Random(seed)
    ops = 0
    t = time.perf_counter()
    for case in range(cases):
        state = machine.machine_for(mmu, model, invariants)()
        step = -1
        try:
            state.setup(
                rng.random() < 0.5,
                rng.random() < 0.5,
                rng.random() < 0.5,
                (
                    rng.randrange(3),
                    rng.randrange(2),
                    rng.randrange(2),
                    rng.choice(["none", "accessed", "zap"]),
                    rng.choice([0, 4, 5, 6, 7]),
                ),
                focus or rng.choice(machine.FOCUSES),
            )
            for step in range(steps):  # noqa: B007 - read after a finding
                random_rules(state, rng)
        except Exception as e:  # a finding ends the walk
            ops += len(state.ops)
            return case + 1, ops, time.perf_counter() - t, getattr(e, "name", type(e).__name__), step + 2
        ops += len(state.ops)
        state.teardown()
    return cases, ops, time.perf_counter() - t, None, 0


def main(only: list[str], no_throughput: bool) -> None:
    if no_throughput:
        return mutant_table(only)
    print("state machine throughput (ci profile, generation only)")
    print(f"{'mmu':<11} {'model':<7} {'cases':>6} {'ops':>6} {'time s':>7} {'cases/s':>8} {'ops/s':>7}")
    for mmu in ("tdp", "tdp-legacy", "shadow"):
        for model in ("merged", "v3"):
            n, ops, dt = throughput(mmu, model)
            print(f"{mmu:<11} {model:<7} {n:>6} {ops:>6} {dt:>7.2f} {n / dt:>8.1f} {ops / dt:>7.0f}")
    print()
    print("plain random walk over the same rules (no Hypothesis, no shrinking; 60 cases of 40 steps)")
    print(f"{'mmu':<11} {'model':<7} {'cases':>6} {'ops':>6} {'time s':>7} {'cases/s':>8} {'ops/s':>7}")
    for mmu in ("tdp", "tdp-legacy", "shadow"):
        for model in ("merged", "v3"):
            n, ops, dt, finding, _ = random_walk(mmu, model)
            extra = f"  finding: {finding}" if finding else ""
            print(f"{mmu:<11} {model:<7} {n:>6} {ops:>6} {dt:>7.2f} {n / dt:>8.1f} {ops / dt:>7.0f}{extra}")
    print()
    mutant_table(only)


def mutant_table(only: list[str]) -> None:
    print("mutants (ci profile, on the configuration of each mutant's HUNT, its own invariants checked)")
    print(
        f"{'mutant':<42} {'mmu':<6} {'focus':<8} {'first failure s':>15} {'shrunk s':>9} {'steps':>5} "
        f"{'stated':>6} {'all checked s':>13} {'walk s':>7} {'walk len':>8}  invariant"
    )
    own = by_mutant()
    names = [m for m in list_models() if m.startswith("mutants/")]
    if only:
        names = [m for m in names if m in only]
    for name in names:
        h = model_module(name).HUNT
        first, _, _ = hunt(name, GENERATE, h.mmu, own[name], h.focus)
        shrunk, steps, inv = hunt(name, SHRINK, h.mmu, own[name], h.focus)
        every, every_steps, _ = hunt(name, GENERATE, h.mmu, None, h.focus)
        _, _, walk_s, walk_finding, walk_len = random_walk(h.mmu, name, invariants=own[name], focus=h.focus)
        stated = model_module(name).SHORTEST_TRACE
        shown = "-" if steps is None else str(steps)
        every_shown = f"{every:>13.2f}" if every_steps is not None else f"{'none':>13}"
        walk = f"{walk_s:>7.2f} {walk_len:>8}" if walk_finding else f"{'none':>7} {'-':>8}"
        print(
            f"{name:<42} {h.mmu:<6} {h.focus or '-':<8} {first:>15.2f} {shrunk:>9.2f} {shown:>5} {stated:>6} "
            f"{every_shown} {walk}  {inv}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", default="", help="comma-separated mutant names (default: all)")
    parser.add_argument("--no-throughput", action="store_true", help="only the mutant table")
    opts = parser.parse_args()
    main([m for m in opts.mutants.split(",") if m], opts.no_throughput)
