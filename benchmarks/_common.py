"""Model: shared plumbing for the benchmark scripts (no kernel twin).

Each case runs in a fresh child process, so the peak resident set size that
resource.getrusage(RUSAGE_SELF).ru_maxrss reports belongs to that case
alone.  An optional second child per case repeats the case under
tracemalloc, started just before the timed phase, to report the Python heap
the phase itself allocated; its timings are discarded because tracemalloc
slows every allocation down.

Only the standard library is used: resource, time.perf_counter, tracemalloc.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kvmsplit

MIB = 1 << 20
GIB = 1 << 30

# Printed before a child's JSON result, so stray output cannot be mistaken for it.
RESULT_MARKER = "@@bench-result@@ "


def kvmsplit_source_id() -> dict[str, Any]:
    """The kvmsplit modules this process imported: where from, git commit, digest.

    The digest covers exactly the model code that ran, committed or not;
    the parent checks every child saw the same digest, so an edit to the
    model in the middle of a run is reported.
    """
    pkg = Path(str(kvmsplit.__file__)).resolve().parent
    files = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "kvmsplit" or name.startswith("kvmsplit.")) and path:
            files.append(Path(path).resolve())
    files.sort()
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(pkg.parent)).encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"path": str(pkg), "sha256": digest.hexdigest()[:12], "commit": None, "dirty": None}
    try:
        top = subprocess.run(
            ["git", "-C", str(pkg), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
        info["commit"] = subprocess.run(
            ["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", top, "status", "--porcelain", "--", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info["dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def start_info() -> dict[str, Any]:
    """The wall-clock date (as date(1) prints it) and the load average when a run starts."""
    return {"date": time.strftime("%a %d %b %Y %H:%M:%S %Z"), "load": os.getloadavg()}


def describe_run(start: dict[str, Any], source: dict[str, Any]) -> list[str]:
    """Header lines: start date, host and its load, interpreter, the command, the model code measured."""
    if source["commit"] is None:
        code = f"kvmsplit from {source['path']} (not a git checkout), modules sha256 {source['sha256']}"
    else:
        state = "imported modules differ from the commit" if source["dirty"] else "imported modules as committed"
        code = f"kvmsplit from {source['path']} at {source['commit']} ({state}), modules sha256 {source['sha256']}"
    pythonpath = os.environ.get("PYTHONPATH")
    env = f"PYTHONPATH={pythonpath} " if pythonpath else ""

    def load(xs: Sequence[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    return [
        f"date:    {start['date']}",
        f"host:    {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        f"load:    {load(start['load'])} at the start, {load(os.getloadavg())} at the end (1, 5, 15 min)",
        f"python:  {platform.python_implementation()} {platform.python_version()}",
        f"command: {env}{' '.join([sys.executable, *sys.argv])}",
        f"code:    {code}",
    ]


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phase:
    """Time one phase; under tracemalloc, also its Python heap peak and what it kept.

    Use as a context manager around exactly the work being measured.
    """

    def __init__(self, traced: bool) -> None:
        self.traced = traced
        self.seconds = 0.0
        self.rss_before_mib = 0.0
        self.rss_after_mib = 0.0
        self.traced_peak_mib: float | None = None
        self.traced_kept_mib: float | None = None

    def __enter__(self) -> Phase:
        self.rss_before_mib = maxrss_mib()
        if self.traced:
            tracemalloc.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.traced:
            kept, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.traced_peak_mib = peak / MIB
            self.traced_kept_mib = kept / MIB
        self.rss_after_mib = maxrss_mib()

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "rss_before_mib": self.rss_before_mib,
            "rss_peak_mib": self.rss_after_mib,
            "traced_peak_mib": self.traced_peak_mib,
            "traced_kept_mib": self.traced_kept_mib,
        }


def time_int_lists(n: int, spte: int, traced: bool) -> dict[str, Any]:
    """Build @n ints in a plain list two ways: SPTE-like ints and list(range(n)).

    The first builds what a split writes, `spte | (i << 12)`: ints above the
    small-int cache, each a fresh object, as an SPTE would be in a list.
    """
    out: dict[str, Any] = {}
    for name, build in (
        ("list_spte", lambda: [spte | (i << 12) for i in range(n)]),
        ("list_range", lambda: list(range(n))),
    ):
        with Phase(traced) as phase:
            values = build()
        assert len(values) == n
        del values
        out[name] = phase.as_dict()
    return out


def emit_result(result: dict[str, Any]) -> None:
    """Child side: hand the case's result to the parent."""
    result["source"] = kvmsplit_source_id()
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(script: str, args: Sequence[str]) -> dict[str, Any]:
    """Parent side: run one case in a fresh interpreter and return its result."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {' '.join(cmd)}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise SystemExit(f"benchmark child printed no result: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def run_best_of(
    script: str, args: Sequence[str], repeat: int, seconds: Callable[[dict[str, Any]], float]
) -> dict[str, Any]:
    """Run one case @repeat times; return the fastest run, with every run's time in "all_seconds".

    The minimum is the figure least disturbed by other work on the machine.
    """
    runs = [run_child(script, args) for _ in range(repeat)]
    best = min(runs, key=seconds)
    best["all_seconds"] = [seconds(r) for r in runs]
    best["all_sources"] = [r["source"] for r in runs]
    return best


def check_same_source(results: Sequence[dict[str, Any]]) -> str | None:
    """A warning if the model's sources changed while the cases ran."""
    digests = {r["source"]["sha256"] for r in results}
    digests |= {src["sha256"] for r in results for src in r.get("all_sources", [])}
    if len(digests) > 1:
        return f"WARNING: kvmsplit sources changed during the run (digests {sorted(digests)}); rerun for consistent figures"
    return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, right-aligned except the first column."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(cells[0]).ljust(widths[0])]
        parts += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def fmt_rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def expect(cond: bool, what: str) -> None:
    """Stop the case when the model did not reach the state the benchmark relies on."""
    if not cond:
        raise SystemExit(f"benchmark precondition failed: {what}")
