"""`kvmsplit conform`: run the conformance scenarios on real KVM and on the model.

Exit codes: 0 every observation agrees (or differs only where a difference
is expected), 1 a disagreement or a scenario error, 2 bad usage, 3 real KVM
cannot be used here (the reason is printed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

EXIT_OK, EXIT_DISAGREE, EXIT_USAGE, EXIT_NO_KVM = 0, 1, 2, 3


@click.command("conform")
@click.argument("scenario_names", metavar="[SCENARIO]...", nargs=-1)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every observation to FILE."
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the kernel's observations to FILE, for replaying against the model without /dev/kvm.",
)
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@click.option("--no-invariants", is_flag=True, help="Do not check the model's invariants while it runs (faster).")
def conform(
    scenario_names: tuple[str, ...],
    json_path: Path | None,
    record_path: Path | None,
    list_only: bool,
    no_invariants: bool,
) -> None:
    """Run each SCENARIO (default: all) on /dev/kvm and on the model, and compare what both report."""
    from kvmsplit.realkvm.conform import format_result, format_summary, kernel_record, run_conformance
    from kvmsplit.realkvm.scenarios import SCENARIOS
    from kvmsplit.realkvm.vm import KvmUnavailable

    if list_only:
        for name, make in SCENARIOS.items():
            doc = make().doc.splitlines()[0] if make().doc else ""
            click.echo(f"{name:<36} {doc}")
        sys.exit(EXIT_OK)
    unknown = [n for n in scenario_names if n not in SCENARIOS]
    if unknown:
        click.echo(
            f"kvmsplit conform: unknown scenario(s) {', '.join(unknown)}; `kvmsplit conform --list` lists them",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    chosen = [SCENARIOS[n]() for n in (scenario_names or tuple(SCENARIOS))]
    start = time.monotonic()
    try:
        run = run_conformance(chosen, check_invariants=not no_invariants)
    except KvmUnavailable as e:
        click.echo(f"kvmsplit conform: real KVM cannot be used: {e}", err=True)
        if json_path is not None:
            json_path.write_text(json.dumps({"kvm_unavailable": str(e)}, indent=1) + "\n")
        sys.exit(EXIT_NO_KVM)
    for result in run.results:
        click.echo(format_result(result))
        click.echo("")
    click.echo(format_summary(run))
    click.echo(f"wall time {time.monotonic() - start:.2f} s")
    if json_path is not None:
        json_path.write_text(json.dumps(run.to_json(), indent=1) + "\n")
    if record_path is not None:
        record_path.write_text(json.dumps(kernel_record(run, chosen), indent=1, sort_keys=True) + "\n")
    sys.exit(EXIT_DISAGREE if run.any_disagreement else EXIT_OK)
