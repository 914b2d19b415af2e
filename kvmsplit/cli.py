"""The kvmsplit command: check, prove, replay, show, selftest and the listings.

Exit codes, the same for every command (docs/cli.md):

- 0: everything held, or every query was proved;
- 1: a finding: an invariant violation, a mirrored kernel WARN, an unmet
  scenario expectation, a crash of the model under test, or a refuted query;
- 2: bad usage or bad input (a malformed trace, an unknown model), reported
  on stderr naming the file, the operation and the field, before anything runs;
- 3: no verdict: a solver timeout, Hypothesis giving up, or a missing
  resource (Z3, the Graphviz `dot` program).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 3

STAT_ORDER = (
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "mmu_cache_miss",
    "mmu_shadow_zapped",
    "mmu_unsync",
    "remote_tlb_flush_requests",
    "nx_lpage_splits",
)


def _fail_usage(message: str) -> NoReturn:
    click.echo(f"kvmsplit: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _fail_unknown(message: str) -> NoReturn:
    click.echo(f"kvmsplit: {message}", err=True)
    sys.exit(EXIT_UNKNOWN)


def _run_trace_or_fail(cfg: Any, ops: list[dict[str, Any]], source: str) -> Any:
    """run_trace(); an operation the model rejects while running is bad input, named by position."""
    from kvmsplit.trace import run_trace

    done = [0]

    def count(rec: Any) -> None:
        done[0] = rec.index + 1

    try:
        return run_trace(cfg, ops, on_step=count)
    except HarnessError as e:
        i = done[0]
        name = ops[i].get("op") if i < len(ops) and isinstance(ops[i], dict) else "?"
        _fail_usage(f"{source}: operation {i} ({name}): {e}")
    except Exception as e:
        # The model under test crashed (a bug in a model file): a finding, with its traceback.
        import traceback

        i = done[0]
        name = ops[i].get("op") if i < len(ops) and isinstance(ops[i], dict) else "?"
        click.echo(traceback.format_exc(), err=True)
        click.echo(f"{source}: operation {i} ({name}): the model crashed: {type(e).__name__}: {e}", err=True)
        sys.exit(EXIT_VIOLATION)


def _load_trace_file(trace: str, model: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    from kvmsplit.models_registry import load_model
    from kvmsplit.trace import load_trace

    try:
        text = Path(trace).read_text()
    except OSError as e:
        _fail_usage(f"{trace}: {e.strerror}")
    except UnicodeDecodeError:
        _fail_usage(f"{trace}: not a text file")
    try:
        cfg, ops = load_trace(text, trace)
        if model is not None:
            load_model(model)
            cfg.model = model
        else:
            load_model(cfg.model)
    except HarnessError as e:
        _fail_usage(str(e))
    return cfg, ops


def _stats_table(stats: dict[str, int], extra: dict[str, Any] | None = None) -> str:
    rows = [(k, stats[k]) for k in STAT_ORDER if k in stats]
    rows += sorted((k, v) for k, v in (extra or {}).items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _failure_kind(e: BaseException | None) -> str | None:
    if e is None:
        return None
    if isinstance(e, InvariantViolation):
        return "invariant"
    if isinstance(e, KvmBugOn):
        return "kvm_bug_on"
    return "crash"


def _failure_name(e: BaseException | None) -> str | None:
    if e is None:
        return None
    if isinstance(e, InvariantViolation):
        return e.name
    if isinstance(e, KvmBugOn):
        return e.site
    return type(e).__name__


def _report_failure(result: Any) -> None:
    from kvmsplit.properties.registry import INVARIANTS

    e = result.failure
    step = result.failed_step
    op = result.steps[-1].op if result.steps else {}
    click.echo(f"FAILED at step {step}: {json.dumps(op)}")
    if isinstance(e, InvariantViolation):
        inv = INVARIANTS.get(e.name)
        click.echo(f"  invariant {e.name}" + (f": {inv.statement}" if inv else ""))
        if inv:
            click.echo(f"  relied on by {inv.kernel}")
        click.echo(f"  {e.message}")
    elif isinstance(e, KvmBugOn):
        click.echo(f"  kernel WARN mirrored in {e.site}(): {e.message}")


def _run(cfg: Any, ops: list[dict[str, Any]], title: str, as_json: bool, source: str = "scenario") -> int:
    from kvmsplit.properties import invariants as _registers  # noqa: F401
    from kvmsplit.properties.registry import INVARIANTS

    result = _run_trace_or_fail(cfg, ops, source)
    kvm = result.kvm
    extra = {"n_used_mmu_pages": kvm.n_used_mmu_pages, "tdp_mmu_pages": kvm.tdp_mmu_pages}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "title": title,
                    "config": cfg.to_dict(),
                    "steps": len(result.steps),
                    "ok": result.ok,
                    "failed_step": result.failed_step,
                    "failure": str(result.failure) if result.failure else None,
                    "failure_kind": _failure_kind(result.failure),
                    "failure_name": _failure_name(result.failure),
                    "failed_op": result.steps[-1].op if result.failure and result.steps else None,
                    "invariants": len(INVARIANTS),
                    "step_checks": result.step_checks,
                    "unlock_checks": result.unlock_checks,
                    "split_checks": result.split_checks,
                    "stats": kvm.stat.as_dict() | extra,
                    "split_events": dict(kvm.model_split_env.events),
                },
                indent=1,
            )
        )
    else:
        click.echo(title)
        click.echo(f"  config: {json.dumps(cfg.to_dict())}")
        click.echo(
            f"  {len(result.steps)} operations; {len(INVARIANTS)} invariants checked "
            f"{result.step_checks} times after operations, {result.unlock_checks} times at mmu_lock releases"
            f" and {result.split_checks} times across huge page splits"
        )
        for rec in result.steps:
            if rec.op.get("op") == "expect" and rec.index != result.failed_step:
                want = ", ".join(f"{k}={v}" for k, v in rec.op.items() if k != "op")
                shown = ", ".join(f"{k}={rec.stats[k]}" for k in ("pages_4k", "pages_2m", "pages_1g"))
                click.echo(f"  checkpoint after operation {rec.index}: {shown} (expected {want})")
        if result.ok:
            click.echo("all invariants held; page stats:")
        else:
            _report_failure(result)
            click.echo("page stats at the failure:")
        click.echo(_stats_table(kvm.stat.as_dict(), extra))
        if kvm.model_split_env.events:
            click.echo("split events: " + ", ".join(f"{k}={v}" for k, v in sorted(kvm.model_split_env.events.items())))
    return EXIT_OK if result.ok else EXIT_VIOLATION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmsplit")
def main() -> None:
    """kvmsplit: check KVM huge page splitting against a reference MMU."""


@main.command("scenarios")
def scenarios_cmd() -> None:
    """List the built-in scenarios, one name a line."""
    from kvmsplit.scenarios import SCENARIOS

    for name in SCENARIOS:
        click.echo(name)


@main.command("models")
def models_cmd() -> None:
    """List the models, one name a line (mutants as mutants/<name>)."""
    from kvmsplit.models_registry import list_models

    for name in list_models():
        click.echo(name)


@main.command("invariants")
@click.option("--markdown", is_flag=True, help="a Markdown table (docs/invariants.md)")
def invariants_cmd(markdown: bool) -> None:
    """List the named invariants: kind, statement, the kernel function relying on it, its mutant."""
    from kvmsplit.properties import invariants as _registers  # noqa: F401
    from kvmsplit.properties.registry import INVARIANTS

    if markdown:
        click.echo("| invariant | checked | statement | relied on by | mutant that breaks it |")
        click.echo("|---|---|---|---|---|")
        when = {
            "state": "after each operation",
            "unlock": "at each mmu_lock release",
            "return": "when an ioctl returns",
            "split": "across each huge page split",
            "split_pass": "after each split entry point",
        }
        for inv in INVARIANTS.values():
            click.echo(
                f"| `{inv.name}` | {when[inv.kind]} | {inv.statement} | {inv.kernel} | {f'`{inv.mutant}`' if inv.mutant else 'none yet'} |"
            )
        return
    for inv in INVARIANTS.values():
        click.echo(f"{inv.name} [{inv.kind}]: {inv.statement}")


@main.command("scenario")
@click.argument("name", required=False)
@click.option("--model", default=None, help="model name or path (default: the scenario's, merged)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def scenario_cmd(name: str | None, model: str | None, as_json: bool) -> None:
    """Run a built-in scenario with every invariant checked; print the page stats."""
    from kvmsplit.models_registry import load_model
    from kvmsplit.scenarios import DEFAULT_SCENARIO, get_scenario

    try:
        sc = get_scenario(name or DEFAULT_SCENARIO)
        cfg = sc.config
        if model is not None:
            load_model(model)
            cfg.model = model
    except HarnessError as e:
        _fail_usage(str(e))
        return
    title = f"scenario {sc.name} (model {cfg.model}): {sc.doc.strip().splitlines()[0] if sc.doc else ''}"
    sys.exit(_run(cfg, sc.ops, title, as_json, f"scenario {sc.name}"))


@main.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="override the trace's model")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def replay_cmd(trace: str, model: str | None, as_json: bool) -> None:
    """Replay a JSON trace, checking every invariant after every step and at every mmu_lock release."""
    cfg, ops = _load_trace_file(trace, model)
    sys.exit(_run(cfg, ops, f"trace {trace} (model {cfg.model})", as_json, trace))


@main.command("compare")
@click.argument("names", nargs=-1)
@click.option("--models", "model_names", default="merged,v3", show_default=True, help="comma-separated models")
def compare_cmd(names: tuple[str, ...], model_names: str) -> None:
    """Run scenarios on several models and show where their stats and splits differ."""
    from kvmsplit.models_registry import load_model
    from kvmsplit.scenarios import SCENARIOS, get_scenario
    from kvmsplit.trace import run_trace

    models = [m.strip() for m in model_names.split(",") if m.strip()]
    try:
        for m in models:
            load_model(m)
        scs = [get_scenario(n) for n in (names or SCENARIOS)]
    except HarnessError as e:
        _fail_usage(str(e))
        return
    worst = EXIT_OK
    for sc in scs:
        rows: dict[str, list[str]] = {}
        verdicts = []
        for m in models:
            cfg = sc.config
            cfg = type(cfg)(**(cfg.to_dict() | {"model": m}))
            r = run_trace(cfg, sc.ops)
            verdicts.append("ok" if r.ok else f"FAIL step {r.failed_step}: {r.failure}")
            if not r.ok:
                worst = EXIT_VIOLATION
            values = r.kvm.stat.as_dict() | {f"split:{k}": v for k, v in r.kvm.model_split_env.events.items()}
            values["n_used_mmu_pages"] = r.kvm.n_used_mmu_pages
            for k, v in values.items():
                rows.setdefault(k, ["0"] * len(models))[models.index(m)] = str(v)
        click.echo(f"{sc.name}")
        for m, v in zip(models, verdicts, strict=True):
            click.echo(f"  {m}: {v}")
        diff = {k: v for k, v in rows.items() if len(set(v)) > 1}
        if not diff:
            click.echo("  identical stats and split events")
            continue
        width = max(len(k) for k in diff)
        click.echo(f"  {'':<{width}}  " + "  ".join(f"{m:>10}" for m in models))
        for k in sorted(diff):
            click.echo(f"  {k:<{width}}  " + "  ".join(f"{v:>10}" for v in diff[k]))
    sys.exit(worst)


# --- check ---------------------------------------------------------------------------------


def _events_text(events: dict[str, int], limit: int = 6) -> str:
    if not events:
        return "no split events yet"
    top = sorted(events.items(), key=lambda kv: (-kv[1], kv[0]))
    text = " ".join(f"{k}={v}" for k, v in top[:limit])
    return text + (f" (+{len(top) - limit} more)" if len(top) > limit else "")


class _PlainProgress:
    """One line when a machine starts and one when it ends: for logs and CI."""

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, run: Any) -> None:
        click.echo(f"{run.mmu}: running up to {run.max_examples} examples")

    def update(self, run: Any) -> None:
        pass

    def finish(self, run: Any) -> None:
        from kvmsplit.machine import RARE_EVENTS

        verdict = run.status if run.status != "error" else f"no verdict ({run.error})"
        click.echo(
            f"{run.mmu}: {verdict}: {run.examples} examples, {run.steps} steps, {run.seconds:.1f} s; "
            f"rare events {len(run.rare_events_seen())}/{len(RARE_EVENTS)}; {_events_text(run.events)}"
        )


class _RichProgress:
    """A live table on a terminal: examples, steps and the split events seen so far."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
        from rich.table import Column

        self.console = Console()

        # Fixed columns never wrap; the events column takes what is left
        # and is cut short on a narrow terminal.
        def fixed() -> Column:
            return Column(no_wrap=True)

        self.progress = Progress(
            SpinnerColumn(table_column=fixed()),
            TextColumn("[bold]{task.description:<10}", table_column=fixed()),
            BarColumn(bar_width=12, table_column=fixed()),
            TextColumn("{task.completed:>4}/{task.total} ex", table_column=fixed()),
            TextColumn("{task.fields[steps]:>6} steps", table_column=fixed()),
            TextColumn("{task.fields[status]}", table_column=fixed()),
            TextColumn("[dim]{task.fields[events]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=self.console,
            expand=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def start(self, run: Any) -> None:
        self.tasks[run.mmu] = self.progress.add_task(
            run.mmu, total=run.max_examples, steps=0, status="generating", events=""
        )

    def update(self, run: Any) -> None:
        from kvmsplit.machine import RARE_EVENTS

        status = {"running": "shrinking" if run.shrinking else "generating", "passed": "[green]passed"}.get(
            run.status, "[red]FAILED" if run.status == "failed" else "[yellow]no verdict"
        )
        self.progress.update(
            self.tasks[run.mmu],
            completed=min(run.examples, run.max_examples) if run.status == "running" else run.max_examples,
            steps=run.steps,
            status=status,
            events=f"rare {len(run.rare_events_seen())}/{len(RARE_EVENTS)}: {_events_text(run.events, 4)}",
        )

    def finish(self, run: Any) -> None:
        self.update(run)


def _print_finding(run: Any, out_dir: Path, selftest: bool) -> None:
    from kvmsplit.properties import invariants as _registers  # noqa: F401
    from kvmsplit.properties.registry import INVARIANTS
    from kvmsplit.reproducer import describe_op, selftest_source, write_pytest, write_trace

    f = run.finding
    click.echo("")
    if f is None:
        click.echo(f"FAILED {run.mmu} (model {run.model}): {run.error}")
        return
    click.echo(f"FAILED {run.mmu} (model {run.model}) at operation {f.step} of {len(f.ops)}")
    if f.kind == "invariant":
        inv = INVARIANTS.get(f.name)
        click.echo(f"  invariant {f.name}" + (f": {inv.statement}" if inv else ""))
        if inv:
            click.echo(f"  relied on by {inv.kernel}")
    elif f.kind == "kvm_bug_on":
        click.echo(f"  kernel WARN mirrored in {f.name}()")
    else:
        click.echo(f"  the model crashed: {f.name}")
    click.echo(f"  {f.message}")
    click.echo(f"shrunk trace ({len(f.ops)} operations, config {json.dumps(f.config.to_dict())}):")
    for i, op in enumerate(f.ops):
        mark = "  <-- fails here" if i == f.step else ""
        click.echo(f"  {i:>3}  {describe_op(op)}{mark}")
    replay = run.replay
    if replay is not None:
        kvm = replay.kvm
        click.echo(f"state at operation {f.step} (page stats):")
        extra = {"n_used_mmu_pages": kvm.n_used_mmu_pages, "tdp_mmu_pages": kvm.tdp_mmu_pages}
        click.echo(_stats_table(kvm.stat.as_dict(), extra))
    if not run.reproduced:
        got = f"step {replay.failed_step}: {replay.failure}" if replay is not None and replay.failure else "no failure"
        click.echo(f"warning: replaying the saved trace gives {got}, not the same failure (a harness bug)", err=True)
    slug = f.slug()
    trace_path = write_trace(f, out_dir / f"{slug}.json")
    test_path = write_pytest(f, out_dir / f"test_{slug}.py", str(trace_path))
    run.files = {"trace": str(trace_path), "pytest": str(test_path)}
    if selftest:
        stats = [rec.stats for rec in replay.steps] if replay is not None else None
        c_path = out_dir / f"{slug}.c"
        c_path.write_text(selftest_source(f.config, f.ops, stats, f, title=f"kvmsplit finding: {f.kind} {f.name}"))
        run.files["selftest"] = str(c_path)
    click.echo("reproducer:")
    click.echo(f"  trace   {trace_path}   (kvmsplit replay {trace_path}; kvmsplit show {trace_path})")
    click.echo(f"  pytest  {test_path}   (python -m pytest {test_path})")
    if selftest:
        click.echo(f"  C       {run.files['selftest']}   (a KVM selftest skeleton)")


def _junit(runs: list[Any], path: Path, model: str, seconds: float) -> None:
    import xml.etree.ElementTree as ET

    suite = ET.Element(
        "testsuite",
        name=f"kvmsplit check {model}",
        tests=str(len(runs)),
        failures=str(sum(r.status == "failed" for r in runs)),
        errors=str(sum(r.status == "error" for r in runs)),
        time=f"{seconds:.3f}",
    )
    for r in runs:
        case = ET.SubElement(
            suite, "testcase", classname=f"kvmsplit.check.{model}", name=f"machine[{r.mmu}]", time=f"{r.seconds:.3f}"
        )
        ET.SubElement(case, "properties")
        props = case.find("properties")
        assert props is not None
        for k, v in (("examples", r.examples), ("steps", r.steps)):
            ET.SubElement(props, "property", name=k, value=str(v))
        if r.status == "failed":
            f = r.finding
            msg = f.message if f is not None else (r.error or "failed")
            node = ET.SubElement(case, "failure", message=msg, type=f.kind if f is not None else "crash")
            node.text = "\n".join([msg, *(f"{k}: {v}" for k, v in r.files.items())])
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.error or "no verdict", type="hypothesis")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")


def _summary(runs: list[Any], args: dict[str, Any], code: int, seconds: float) -> dict[str, Any]:
    machines = []
    for r in runs:
        f = r.finding
        machines.append(
            {
                "mmu": r.mmu,
                "model": r.model,
                "status": r.status,
                "examples": r.examples,
                "steps": r.steps,
                "seconds": round(r.seconds, 3),
                "events": dict(sorted(r.events.items())),
                "rare_events_seen": r.rare_events_seen(),
                "error": r.error,
                "failure": None
                if f is None
                else {
                    "kind": f.kind,
                    "name": f.name,
                    "message": f.message,
                    "step": f.step,
                    "op": f.ops[f.step] if f.step < len(f.ops) else None,
                    "operations": len(f.ops),
                    "reproduced": r.reproduced,
                    "stats": r.replay.kvm.stat.as_dict() if r.replay is not None else None,
                },
                "files": r.files,
            }
        )
    return {"command": "check", **args, "exit_code": code, "seconds": round(seconds, 3), "machines": machines}


@main.command("check")
@click.option("--model", default="merged", show_default=True, help="model name (`kvmsplit models`) or a .py path")
@click.option(
    "--mmu",
    "mmus",
    multiple=True,
    type=click.Choice(["tdp", "tdp-legacy", "shadow"]),
    help="run only this MMU configuration (repeatable; default all three)",
)
@click.option(
    "--profile",
    type=click.Choice(["ci", "dev", "thorough"]),
    default="ci",
    show_default=True,
    help="Hypothesis profile",
)
@click.option(
    "--focus",
    default=None,
    help="start every test case from this focus (kvmsplit/machine.py FOCUSES) instead of drawing one",
)
@click.option(
    "--invariant",
    "invariants",
    multiple=True,
    help="check only this invariant (repeatable; default all; `kvmsplit invariants` lists them)",
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="seed the random choices (no example database)")
@click.option("--max-examples", type=click.IntRange(min=1), default=None, help="override the profile's example count")
@click.option("--out", "out_dir", default="kvmsplit-failures", show_default=True, help="directory for reproducers")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None, help="write a JUnit XML report")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write a JSON summary")
@click.option("--selftest", is_flag=True, help="also write a KVM selftest skeleton (C) for each finding")
def check_cmd(
    model: str,
    mmus: tuple[str, ...],
    profile: str,
    focus: str | None,
    invariants: tuple[str, ...],
    seed: int | None,
    max_examples: int | None,
    out_dir: str,
    junit: str | None,
    json_path: str | None,
    selftest: bool,
) -> None:
    """Run the state machines against a model; shrink and save any violation.

    Every named invariant runs after every operation and at every mmu_lock
    release.  A violation prints the invariant, the shrunk trace and the page
    stats at the failing step, and leaves a JSON trace and a pytest file in
    --out.
    """
    import time

    from kvmsplit.check import MMUS, exit_code, run_machine
    from kvmsplit.models_registry import load_model

    try:
        load_model(model)
    except HarnessError as e:
        _fail_usage(str(e))
    from kvmsplit.machine import FOCUSES
    from kvmsplit.properties import invariants as _registers  # noqa: F401
    from kvmsplit.properties.registry import INVARIANTS

    if focus is not None and focus not in FOCUSES:
        _fail_usage(f"unknown focus {focus!r}; known: {', '.join(FOCUSES)}")
    unknown = [name for name in invariants if name not in INVARIANTS]
    if unknown:
        _fail_usage(f"unknown invariant(s) {', '.join(unknown)}; `kvmsplit invariants` lists them")
    chosen = [m for m in MMUS if not mmus or m in mmus]
    from kvmsplit.profiles import profile_settings

    base = profile_settings(profile)
    n = max_examples or base.max_examples
    click.echo(
        f"kvmsplit check: model {model}, profile {profile} ({n} examples of up to {base.stateful_step_count} steps"
        f"{f', seed {seed}' if seed is not None else ''}), MMUs {', '.join(chosen)}"
        + (f", focus {focus}" if focus else "")
        + (f", checking only {', '.join(invariants)}" if invariants else "")
    )
    from rich.console import Console

    reporter: Any = _RichProgress() if Console().is_terminal else _PlainProgress()
    runs = []
    start = time.monotonic()
    with reporter:
        for mmu in chosen:
            from kvmsplit.check import MachineRun

            reporter.start(MachineRun(mmu=mmu, model=model, max_examples=n))
            run = run_machine(
                mmu,
                model,
                profile,
                max_examples,
                seed,
                on_progress=reporter.update,
                focus=focus,
                invariants=invariants or None,
            )
            reporter.finish(run)
            runs.append(run)
    seconds = time.monotonic() - start
    for run in runs:
        if run.status == "failed":
            _print_finding(run, Path(out_dir), selftest)
    code = exit_code(runs)
    passed = sum(r.status == "passed" for r in runs)
    failed = sum(r.status == "failed" for r in runs)
    errors = len(runs) - passed - failed
    click.echo("")
    click.echo(
        f"{len(runs)} machine(s): {passed} passed, {failed} failed"
        + (f", {errors} without a verdict" if errors else "")
        + f" in {seconds:.1f} s"
    )
    if junit:
        _junit(runs, Path(junit), model, seconds)
    if json_path:
        args = {
            "model": model,
            "profile": profile,
            "seed": seed,
            "max_examples": n,
            "mmus": chosen,
            "focus": focus,
            "invariants": list(invariants) or None,
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_summary(runs, args, code, seconds), indent=1) + "\n")
    sys.exit(code)


# --- prove ---------------------------------------------------------------------------------


@main.command("prove")
@click.argument("queries", nargs=-1)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="seconds per solver call",
)
@click.option("--model", default="merged", show_default=True, help="model whose code the queries run")
@click.option(
    "--write-test",
    "write_test",
    type=click.Path(file_okay=False),
    default=None,
    help="write a regression test for each refuted query into this directory",
)
@click.option("--list", "list_only", is_flag=True, help="list the queries and what each proves")
def prove_cmd(queries: tuple[str, ...], timeout_s: float, model: str, write_test: str | None, list_only: bool) -> None:
    """Run the Z3 queries (all by default): proved, refuted or unknown, with times.

    A refuted query prints the concrete values Z3 found.  Exit 0 when all are
    proved, 1 when one is refuted, 3 when one is unknown (timeout) or Z3 is
    missing.
    """
    try:
        import z3  # noqa: F401
    except ImportError:
        _fail_unknown("Z3 is not installed (pip install z3-solver); nothing was proved")
    try:
        from kvmsplit.properties import smt
    except ImportError as e:
        _fail_unknown(f"the Z3 queries cannot be loaded: {e}")
    table = getattr(smt, "QUERIES", None)
    run_query = getattr(smt, "run_query", None)
    if not table or run_query is None:
        _fail_unknown("this kvmsplit has no Z3 queries (kvmsplit.properties.smt.QUERIES is empty)")
    from kvmsplit.models_registry import load_model

    try:
        load_model(model)
    except HarnessError as e:
        _fail_usage(str(e))
    unknown = [q for q in queries if q not in table]
    if unknown:
        _fail_usage(f"no query named {', '.join(map(repr, unknown))}; known: {', '.join(table)}")
    names = list(queries) or list(table)
    if list_only:
        for name in names:
            q = table[name]
            click.echo(f"{name}: {getattr(q, 'proves', '')}")
        return
    width = max(len(n) for n in names)
    click.echo(f"{'query':<{width}}  {'result':<8}  {'time':>8}")
    results = []
    for name in names:
        try:
            r = run_query(name, timeout_s=timeout_s, model=model)
        except HarnessError as e:
            _fail_usage(str(e))
        results.append(r)
        click.echo(
            f"{r.name:<{width}}  {r.status:<8}  {r.seconds:>7.3f}s"
            + (f"  {r.detail}" if r.detail and r.status != "proved" else "")
        )
        if r.status == "refuted" and r.counterexample:
            for k, v in sorted(r.counterexample.items()):
                click.echo(f"{'':<{width}}    {k} = {v:#x}" if abs(v) > 9 else f"{'':<{width}}    {k} = {v}")
    refuted = [r for r in results if r.status == "refuted"]
    if write_test and refuted:
        Path(write_test).mkdir(parents=True, exist_ok=True)
        for r in refuted:
            path = Path(write_test) / f"test_smt_{r.name}.py"
            smt.write_regression_test(r, path)
            click.echo(f"wrote {path}")
    counts = {s: sum(r.status == s for r in results) for s in ("proved", "refuted", "unknown")}
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
    if refuted:
        sys.exit(EXIT_VIOLATION)
    if counts["unknown"]:
        sys.exit(EXIT_UNKNOWN)
    sys.exit(EXIT_OK)


# --- show ----------------------------------------------------------------------------------


@main.command("show")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option(
    "--step",
    type=click.IntRange(min=0),
    default=None,
    help="draw the state after this operation (default: the failing one, else the last)",
)
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "svg", "png"]), default="text", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="write here (svg and png default to TRACE-stepN.svg/png)",
)
@click.option("--model", default=None, help="override the trace's model")
def show_cmd(trace: str, step: int | None, fmt: str, output: str | None, model: str | None) -> None:
    """Draw the MMU state after one step of a trace: roots, shadow pages, SPTEs, what the step changed."""
    import shutil
    import subprocess

    from kvmsplit.reproducer import describe_op
    from kvmsplit.show import capture, render_dot, render_text

    cfg, ops = _load_trace_file(trace, model)
    if not ops:
        _fail_usage(f"{trace}: the trace has no operations to show")
    if fmt in ("svg", "png") and shutil.which("dot") is None:
        _fail_unknown(
            f"cannot draw {fmt}: the Graphviz `dot` program is not installed "
            "(apt-get install graphviz); --format dot writes the graph source instead"
        )
    full = _run_trace_or_fail(cfg, ops, trace)
    last = full.failed_step if full.failed_step is not None else len(ops) - 1
    if step is None:
        step = last
    elif step > last:
        why = f"fails at operation {last}" if full.failed_step is not None else f"has {len(ops)} operations"
        _fail_usage(f"{trace}: --step {step} is past the end: the trace {why}")
    after_run = full if step == last else _run_trace_or_fail(cfg, ops[: step + 1], trace)
    before_run = _run_trace_or_fail(cfg, ops[:step], trace)
    title = f"{trace}, after operation {step}: {describe_op(ops[step])}"
    if after_run.failure is not None:
        title += f"\n(fails here: {after_run.failure})"
    after, before = capture(after_run.kvm), capture(before_run.kvm)
    if fmt == "text":
        color = output is None and sys.stdout.isatty()
        text = render_text(after, before, title, color=color)
    else:
        text = render_dot(after, before, title)
    if fmt in ("text", "dot"):
        if output is None:
            click.echo(text, nl=False)
        else:
            Path(output).write_text(text)
            click.echo(f"wrote {output}")
        return
    out = Path(output) if output else Path(f"{Path(trace).with_suffix('')}-step{step}.{fmt}")
    try:
        proc = subprocess.run(
            ["dot", f"-T{fmt}", "-o", str(out)], input=text, text=True, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        _fail_unknown("Graphviz `dot` took more than 120 s; try --format text or dot")
    if proc.returncode != 0:
        _fail_unknown(f"Graphviz `dot` failed: {proc.stderr.strip()}")
    click.echo(f"wrote {out}")


# --- selftest ------------------------------------------------------------------------------


@main.command("selftest")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write the C file here")
def selftest_cmd(trace: str, output: str | None) -> None:
    """Write a trace as the skeleton of a KVM selftest in C (tools/testing/selftests/kvm).

    The page stats the reference model computes after each operation become
    vm_get_stat() assertions; operations without a selftest library helper are
    left as TODO comments.
    """
    from kvmsplit.reproducer import Finding, selftest_source

    cfg, ops = _load_trace_file(trace)
    result = _run_trace_or_fail(cfg, ops, trace)
    finding = None
    if result.failure is not None and result.failed_step is not None:
        finding = Finding.from_exception(cfg, ops, result.failed_step, result.failure)
    stats = [rec.stats for rec in result.steps]
    source = selftest_source(cfg, ops, stats, finding, title=f"{Path(trace).name} replayed against KVM")
    if output is None:
        click.echo(source, nl=False)
    else:
        Path(output).write_text(source)
        click.echo(f"wrote {output}")


def _register_conform() -> None:
    # The conformance oracle lives with the KVM userspace it drives.
    from kvmsplit.realkvm.cli import conform

    main.add_command(conform)


_register_conform()

if __name__ == "__main__":
    main()
