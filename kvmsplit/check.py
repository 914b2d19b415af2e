"""Model: `kvmsplit check`, the state machines run as a command instead of a test suite.

For each MMU configuration the state machine of kvmsplit/machine.py runs
under a Hypothesis profile against one model.  A violation is shrunk by
Hypothesis, which replays the minimal example last, so the machine of the
final run holds the shrunk operations; they become a `Finding`, and the
finding is replayed once more through `run_trace()` to confirm that the
saved trace fails at the same step with the same message before anything
is written.

Example::

    from kvmsplit.check import run_machine
    run = run_machine("tdp", "mutants/split_no_rmap", profile="ci")
    assert run.status == "failed" and run.finding.name == "rmap_holds_exactly_present_leaves"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import Verbosity, settings
from hypothesis.control import current_build_context
from hypothesis.errors import HypothesisException
from hypothesis.stateful import run_state_machine_as_test

from kvmsplit.errors import InvariantViolation, KvmBugOn
from kvmsplit.kvm import MMU_CONFIGS
from kvmsplit.machine import RARE_EVENTS, machine_for
from kvmsplit.profiles import profile_settings
from kvmsplit.reproducer import Finding
from kvmsplit.trace import TraceConfig, TraceResult, run_trace

MMUS = MMU_CONFIGS


@attrs.define
class MachineRun:
    """One state machine's run: counts for the progress display, then the outcome."""

    mmu: str
    model: str
    max_examples: int = 0
    # "running", then "passed", "failed" (a finding), or "error" (Hypothesis gave up).
    status: str = "running"
    examples: int = 0
    steps: int = 0
    shrinking: bool = False
    seconds: float = 0.0
    events: dict[str, int] = attrs.field(factory=dict)
    finding: Finding | None = None
    error: str | None = None
    # The finding replayed through run_trace(): the state at the failing step.
    replay: TraceResult | None = None
    reproduced: bool = False
    files: dict[str, str] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return f"{self.mmu} ({self.model})"

    def rare_events_seen(self) -> list[str]:
        return [e for e in RARE_EVENTS if any(e in k and v for k, v in self.events.items())]


def _instrumented(
    mmu: str,
    model: str,
    run: MachineRun,
    tick: Callable[[], None],
    focus: str | None = None,
    invariants: tuple[str, ...] | None = None,
) -> type:
    """A subclass of the machine that counts, remembers its config and finds the final run."""
    base = machine_for(mmu, model, invariants, focus=focus)
    holder: dict[str, Any] = {}

    def init(self: Any) -> None:
        base.__init__(self)
        self._check_cfg = None
        self._check_failed_at = None
        run.examples += 1
        holder["last"] = self
        if current_build_context().is_final:
            holder["final"] = self
        tick()

    def config(self: Any) -> TraceConfig:
        # setup() edits the config it gets back (eager_page_split, nx_huge_pages);
        # hand out one object so the trace records what actually ran.
        if self._check_cfg is None:
            self._check_cfg = base.config(self)
        return self._check_cfg

    def apply(self: Any, op: dict[str, Any]) -> Any:
        run.steps += 1
        try:
            return base.apply(self, op)
        except (InvariantViolation, KvmBugOn):
            self._check_failed_at = len(self.ops) - 1
            if not run.shrinking:
                run.shrinking = True
            raise
        finally:
            tick()

    def teardown(self: Any) -> None:
        if self.kvm is not None:
            for k, v in self.kvm.model_split_env.events.items():
                if v:
                    run.events[k] = run.events.get(k, 0) + v
        base.teardown(self)

    # type() with the base's name, not a class statement: Hypothesis keys its
    # derandomized seed and its example database on the class name, so
    # `kvmsplit check` under the ci profile draws exactly the examples that
    # tests/stateful and tests/quality draw for the same machine.
    cls = type(base.__name__, (base,), {"__init__": init, "config": config, "apply": apply, "teardown": teardown})
    cls._check_holder = holder  # type: ignore[attr-defined]
    return cls


def machine_settings(profile: str, max_examples: int | None, seed: int | None) -> settings:
    s = settings(profile_settings(profile), report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)
    if max_examples is not None:
        s = settings(s, max_examples=max_examples)
    if seed is not None:
        # A seeded run must not pick up a stored example instead.
        s = settings(s, database=None)
    return s


def run_machine(
    mmu: str,
    model: str,
    profile: str = "ci",
    max_examples: int | None = None,
    seed: int | None = None,
    on_progress: Callable[[MachineRun], None] | None = None,
    focus: str | None = None,
    invariants: tuple[str, ...] | None = None,
) -> MachineRun:
    """Run the state machine for @mmu against @model; shrink and confirm any finding.

    @focus starts every test case from that focus instead of drawing one;
    @invariants, if given, are the only ones checked.
    """
    s = machine_settings(profile, max_examples, seed)
    run = MachineRun(mmu=mmu, model=model, max_examples=s.max_examples)
    last_tick = [0.0]

    def tick() -> None:
        now = time.monotonic()
        if on_progress is not None and now - last_tick[0] > 0.1:
            last_tick[0] = now
            on_progress(run)

    cls = _instrumented(mmu, model, run, tick, focus, invariants)
    if seed is not None:
        cls._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    start = time.monotonic()
    try:
        run_state_machine_as_test(cls, settings=s)
        run.status = "passed"
    except (InvariantViolation, KvmBugOn) as e:
        _record_finding(run, cls, e)
    except HypothesisException as e:
        # Flaky, a failed health check, Unsatisfiable: no verdict either way.
        run.status = "error"
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except Exception as e:
        # The model under test crashed (a bug in a model file, say): a finding too.
        _record_finding(run, cls, e)
    run.seconds = time.monotonic() - start
    if on_progress is not None:
        on_progress(run)
    return run


def _record_finding(run: MachineRun, cls: Any, e: BaseException) -> None:
    holder = cls._check_holder
    machine = holder.get("final") or holder.get("last")
    run.status = "failed"
    if machine is None or machine._check_cfg is None:
        run.error = f"{type(e).__name__}: {e} (before the machine recorded any operation)"
        return
    ops = list(machine.ops)
    step = machine._check_failed_at if machine._check_failed_at is not None else len(ops)
    run.finding = Finding.from_exception(machine._check_cfg, ops, step, e)
    done = [0]

    def count(rec: Any) -> None:
        done[0] = rec.index + 1

    try:
        replay = run_trace(run.finding.config, ops, on_step=count)
    except Exception as again:
        # run_trace() reports only findings; a crash of the model escapes it.
        run.reproduced = done[0] == step and type(again) is type(e) and str(again) == str(e)
        return
    run.replay = replay
    run.reproduced = replay.failed_step == step and replay.failure is not None and str(replay.failure) == str(e)


def exit_code(runs: list[MachineRun]) -> int:
    """1 if anything failed, else 3 if Hypothesis gave up on a machine, else 0."""
    if any(r.status == "failed" for r in runs):
        return 1
    if any(r.status == "error" for r in runs):
        return 3
    return 0
