"""The kvmsplit command.

Exit codes: 0 everything held; 1 an invariant violation, a mirrored kernel
WARN or an unmet scenario expectation; 2 bad usage or bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2

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


def _fail_usage(message: str) -> None:
    click.echo(f"kvmsplit: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _stats_table(stats: dict[str, int], extra: dict[str, Any] | None = None) -> str:
    rows = [(k, stats[k]) for k in STAT_ORDER if k in stats]
    rows += sorted((k, v) for k, v in (extra or {}).items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


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


def _run(cfg: Any, ops: list[dict[str, Any]], title: str, as_json: bool) -> int:
    from kvmsplit.trace import run_trace

    try:
        result = run_trace(cfg, ops)
    except HarnessError as e:
        _fail_usage(str(e))
        raise AssertionError from None
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
                    "stats": kvm.stat.as_dict() | extra,
                    "split_events": dict(kvm.model_split_env.events),
                },
                indent=1,
            )
        )
    else:
        click.echo(title)
        click.echo(f"  config: {json.dumps(cfg.to_dict())}")
        from kvmsplit.properties.registry import INVARIANTS

        click.echo(
            f"  {len(result.steps)} operations; {len(INVARIANTS)} invariants checked "
            f"{result.step_checks} times after operations and {result.unlock_checks} times at mmu_lock releases"
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
    sys.exit(_run(cfg, sc.ops, title, as_json))


@main.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="override the trace's model")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def replay_cmd(trace: str, model: str | None, as_json: bool) -> None:
    """Replay a JSON trace, checking every invariant after every step."""
    from kvmsplit.models_registry import load_model
    from kvmsplit.trace import load_trace

    try:
        text = Path(trace).read_text()
    except OSError as e:
        _fail_usage(f"{trace}: {e.strerror}")
        return
    try:
        cfg, ops = load_trace(text, trace)
        if model is not None:
            load_model(model)
            cfg.model = model
    except HarnessError as e:
        _fail_usage(str(e))
        return
    sys.exit(_run(cfg, ops, f"trace {trace} (model {cfg.model})", as_json))


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


if __name__ == "__main__":
    main()
